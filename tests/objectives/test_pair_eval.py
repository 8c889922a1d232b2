"""`slimtune eval RUN --data pairs.jsonl` scores any run on held-out pairs: an SFT run (its adapter against the
adapter switched off, as DPO would) and a full fine-tuning run (against the base model loaded beside it)."""
from __future__ import annotations

import json

import pref_train
import pytest
import torch

from conftest import lora_run_config, write_jsonl
from slimtune import cli
from slimtune.commands import eval as eval_cmd
from slimtune.engine.pair_logps import collate_pairs, sequence_logps
from slimtune.engine.preference_step import items
from slimtune.trained import load_run

PAIRS = [{"prompt": "Say something.", "chosen": "Here is Paris.", "rejected": "No."}]  # named; records from below


def _read(cfg, tokenizer, path):
    return pref_train.built(cfg, tokenizer, print).eval


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("sft")
    cfg = lora_run_config(tmp, tiny_model_dir, "run", max_steps=3, micro_batch_size=4, method={"dropout": 0.0})
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    return tmp / "run"


def test_eval_scores_an_sft_run_on_pairs(sft_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(eval_cmd, "_read_pairs", _read)
    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    assert cli.main(["eval", str(sft_run), "--data", str(data), "--output", str(tmp_path / "out")]) == 0
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert scores["records"] == 4 and scores["objective"] == "dpo" and scores["reference"] == "adapter_off"
    # the same numbers by hand: beta x ((policy - base) chosen - (policy - base) rejected), beta 0.1
    model, _, cfg = load_run(sft_run)
    records = items(_read(cfg, None, data), "dpo", "eval")
    batch = collate_pairs(records, 0, "cpu")
    with torch.no_grad():
        live, _ = sequence_logps(model, batch)
        with model.disable_adapter():
            base, _ = sequence_logps(model, batch)
    ratio = live - base
    margins = 0.1 * (ratio[:4] - ratio[4:])
    assert abs(scores["rewards/margins"] - float(margins.mean())) < 1e-6
    assert scores["rewards/accuracy"] == float((margins > 0).float().mean())
    out = capsys.readouterr().out
    assert f"preference accuracy {scores['rewards/accuracy']:.3f}, mean margin {scores['rewards/margins']:.4f}" in out


def test_answers_files_still_go_to_the_answers_eval(tmp_path):
    assert not eval_cmd._is_pairs(str(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "output": "y"}])))
    assert eval_cmd._is_pairs(str(write_jsonl(tmp_path / "p.jsonl", PAIRS)))
    (tmp_path / "p.json").write_text(json.dumps(PAIRS))  # a JSON array, as LLaMA-Factory's dpo_en_demo.json
    assert eval_cmd._is_pairs(str(tmp_path / "p.json"))


def test_loss_png_draws_a_preference_runs_accuracy(tmp_path):
    from slimtune.evaluate import plots

    rows = [{"step": 0, "eval_loss": 0.69, "eval_rewards/accuracy": 0.0},
            {"step": 1, "loss": 0.69, "rewards/accuracy": 0.25}, {"step": 2, "loss": 0.5, "rewards/accuracy": 0.75},
            {"step": 2, "eval_loss": 0.55, "eval_rewards/accuracy": 0.5}]
    assert plots.accuracy_points(rows) == ([(1, 0.25), (2, 0.75)], [(0, 0.0), (2, 0.5)])
    assert plots.accuracy_points([{"step": 1, "loss": 2.0}]) == ([], [])
    with_acc = plots.loss_png(rows, tmp_path / "a.png").read_bytes()
    plain = plots.loss_png([{k: v for k, v in r.items() if "accuracy" not in k} for r in rows], tmp_path / "b.png")
    assert with_acc != plain.read_bytes()
