"""Evaluation during training (train.eval_every, train.eval_generate): eval_* rows at the right steps whose
loss is the model's at that step, generation scores and predictions at the end, and training numbers that
are the same whether the run evaluates or not."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from conftest import lora_run_config, write_jsonl
from slimtune import config
from slimtune import train as train_mod
from slimtune.config import ConfigError
from slimtune.data import build
from slimtune.data.collate import pad_id
from slimtune.runs import checkpoint
from slimtune.runs.metrics_log import read_metrics
from slimtune.evaluate.perplexity import eval_loss
from slimtune.trained import load_run



def _config(tmp: Path, model_dir: Path, name: str, **train) -> config.Config:
    """Dropout on, so a step that ran in eval mode or with other dropout masks would change the loss."""
    return config.load(lora_run_config(tmp, model_dir, name, copies=3,
                                       **{"max_steps": 6, "micro_batch_size": 4, "warmup_steps": 0,
                                          "scheduler": "constant", **train}))


def _train(cfg: config.Config) -> dict:
    return train_mod.from_config(cfg, show_progress=False, log=lambda *a: None)


def _rows(run: Path, key: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if key in r]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _rows(run, "loss")]


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model_dir):
    """The same run without evaluation during training."""
    tmp = tmp_path_factory.mktemp("evals")
    _train(_config(tmp, tiny_model_dir, "plain"))
    return tmp


@pytest.fixture(scope="module")
def every2(plain, tiny_model_dir):
    cfg = _config(plain, tiny_model_dir, "every2", eval_every=2, save_every=2, keep_checkpoints=0)
    return _train(cfg), cfg


def test_eval_rows_at_every_n_steps_hold_the_loss_of_the_model_at_that_step(every2, tokenizer):
    result, cfg = every2
    run = Path(cfg.train.output_dir)
    rows = _rows(run, "eval_loss")
    assert [r["step"] for r in rows] == [0, 2, 4, 6]  # the last step's eval is the end-of-training one, once
    assert all(math.isfinite(r["eval_loss"]) and r["eval_tokens"] > 0 for r in rows)
    assert all("eval_em" not in r and "loss" not in r for r in rows)  # no generation asked; not a train row
    held = build(cfg.data, tokenizer, log=lambda *a: None).eval
    # checkpoints at steps 2 and 4 hold the model as it was when those rows were measured; the run folder
    # holds the final one
    folders = {s: p for s, p in checkpoint.complete(run / checkpoint.ROOT)}
    for step, folder in ((2, folders[2]), (4, folders[4]), (6, run)):
        model, tok, _ = load_run(folder)
        fresh = eval_loss(model, held, pad_id(tok), cfg.train.micro_batch_size)["eval_loss"]
        logged = next(r["eval_loss"] for r in rows if r["step"] == step)
        assert logged == pytest.approx(fresh, abs=1e-5), step
        chunked = eval_loss(model, held, pad_id(tok), cfg.train.micro_batch_size, chunked=True)["eval_loss"]
        assert chunked == pytest.approx(fresh, abs=1e-5), step  # GPU runs evaluate with the chunked loss
    assert result["eval_after"]["eval_loss"] == rows[-1]["eval_loss"]
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert scores["step"] == 6 and scores["eval_loss"] == rows[-1]["eval_loss"] and scores["records"] == len(held)
    assert not (run / "eval" / "predictions.jsonl").exists()


def test_evaluating_changes_no_training_number(every2, plain):
    _, cfg = every2
    run = Path(cfg.train.output_dir)
    assert _losses(run) == _losses(plain / "plain")  # bit-identical, dropout on
    plain_evals = _rows(plain / "plain", "eval_loss")
    assert [r["step"] for r in plain_evals] == [0, 6]
    assert plain_evals[-1]["eval_loss"] == _rows(run, "eval_loss")[-1]["eval_loss"]


def test_eval_rows_reach_tensorboard(every2):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(cfg_dir := every2[1].train.output_dir)
    acc.Reload()
    assert [e.step for e in acc.Scalars("eval/loss")] == [0, 2, 4, 6], cfg_dir


def test_generation_scores_each_eval_and_writes_predictions(plain, tiny_model_dir, monkeypatch):
    real = train_mod.in_training

    def drawing(*args, **kwargs):  # a hook that also draws from every RNG: training must not notice
        hook = real(*args, **kwargs)

        def wrapped(model, context, step=None):
            torch.rand(7), random.random()
            return hook(model, context, step)
        return wrapped

    monkeypatch.setattr(train_mod, "in_training", drawing)
    cfg = _config(plain, tiny_model_dir, "gen", eval_every=3, eval_generate=True, eval_max_records=2,
                  eval_max_new_tokens=6, eval_separator=".")
    result = _train(cfg)
    run = Path(cfg.train.output_dir)
    rows = _rows(run, "eval_loss")
    assert [r["step"] for r in rows] == [0, 3, 6]
    for r in rows:
        for key in ("eval_em", "eval_f1", "eval_bleu4", "eval_rouge1", "eval_rouge2", "eval_rougeL",
                    "eval_extraction_precision", "eval_extraction_recall", "eval_extraction_f1", "eval_unfinished"):
            assert math.isfinite(r[key]), key
    assert _losses(run) == _losses(plain / "plain")  # generation left the model training, as it was
    assert rows[-1]["eval_loss"] == _rows(plain / "plain", "eval_loss")[-1]["eval_loss"]

    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert scores["records"] == 4 and scores["generated_records"] == 2 and scores["max_new_tokens"] == 6
    assert scores["separator"] == "." and scores["step"] == 6
    preds = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and all({"where", "prediction", "reference", "em", "f1"} <= set(p) for p in preds)
    assert scores["em"] == pytest.approx(100 * sum(p["em"] for p in preds) / 2, abs=1e-3)
    assert result["eval_after"]["eval_f1"] == scores["f1"] == rows[-1]["eval_f1"]


def test_bad_eval_keys_are_config_errors_naming_the_key():
    with pytest.raises(ConfigError) as err:
        config.load(None, ["train.eval_every=-1", "train.eval_max_records=-2", "train.eval_max_new_tokens=0"])
    assert str(err.value).splitlines() == ["train.eval_every: must be >= 0", "train.eval_max_records: must be >= 0",
                                           "train.eval_max_new_tokens: must be at least 1"]
    with pytest.raises(ConfigError) as err:
        config.load(None, ["train.eval_every=x"])
    assert "train.eval_every: expected an integer" in str(err.value)
    with pytest.raises(ConfigError) as err:
        config.load(None, ["data.eval_size=0", "train.eval_every=5", "train.eval_generate=true"])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[0].startswith("train.eval_every: there is no held-out split")
    assert lines[1].startswith("train.eval_generate:") and "data.eval_size" in lines[1]
    assert config.load(None, ["data.eval=held.jsonl", "data.eval_size=0", "train.eval_every=5"]).train.eval_every == 5


def test_a_resumed_run_may_change_its_eval_keys():
    a = config.load(None, [])
    b = config.load(None, ["train.eval_every=10", "train.eval_generate=true", "train.eval_max_records=5",
                           "train.eval_max_new_tokens=32", "train.eval_separator=,"])
    assert checkpoint.differences(a, b) == []


def test_eval_examples_stay_paired_with_eval_records(tmp_path, tokenizer):
    """A held-out record whose answer is truncated away leaves both lists."""
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Hi", "output": "Hello there."}] * 4)
    held = write_jsonl(tmp_path / "held.jsonl", [
        {"instruction": "Say something about Paris.", "output": "Here is Paris."},
        {"instruction": " ".join(["the quick brown fox"] * 40), "output": "lost"},
        {"instruction": "Say something about blue.", "output": "Here is blue."}])
    cfg = config.load(None, [f"data.train={train}", f"data.eval={held}", "data.max_len=32"]).data
    built = build(cfg, tokenizer, log=lambda *a: None)
    assert [r.where for r in built.eval] == [e.where for e in built.eval_examples]
    assert [e.messages[-1]["content"] for e in built.eval_examples] == ["Here is Paris.", "Here is blue."]
