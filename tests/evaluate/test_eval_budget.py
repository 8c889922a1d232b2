"""Evaluation sized to the run: in-training evals capped at train.eval_max_tokens (auto: in proportion to
the training tokens), a time estimate printed before each, and the eval before training reused across runs
of the same model, held-out records and method."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import lora_run_config
from slimtune import config
from slimtune import train as train_mod
from slimtune.data.encode import Encoded
from slimtune.runs.metrics_log import read_metrics
from slimtune.evaluate import cache
from slimtune.evaluate.report import MIN_EVAL_TOKENS, _within, eval_token_cap


def _records(n: int, length: int) -> list[Encoded]:
    return [Encoded(list(range(length)), [-100] * (length // 2) + list(range(length - length // 2)), f"r{i}")
            for i in range(n)]


@pytest.mark.parametrize("overrides, cap", [
    ([], MIN_EVAL_TOKENS),  # 5 steps x 4 records x 100 tokens: 3/4 of 2,000 over 2 evals is below the floor
    (["train.max_steps=200"], 30_000),  # 3/4 x 80,000 tokens / 2 evals (before, after)
    (["train.max_steps=200", "train.eval_every=50"], 12_000),  # ... / 5 evals (before, at 50, 100, 150, after)
    (["train.max_steps=200", "train.eval_at_start=false"], 60_000),
    (["train.eval_max_tokens=0"], 0),
    (["train.eval_max_tokens=500"], 500),
])
def test_the_auto_cap_is_in_proportion_to_the_run(overrides, cap):
    cfg = config.load(None, ["train.max_steps=5", "train.micro_batch_size=4", *overrides])
    assert eval_token_cap(cfg, _records(10, 100), _records(40, 100)) == cap


def test_records_within_a_cap():
    recs = _records(10, 100)
    assert _within(recs, 0) == 10 and _within(recs, 350) == 3 and _within(recs, 50) == 1 and _within(recs, 10**6) == 10


def _run(tmp: Path, model_dir: Path, name: str, **train) -> tuple[dict, list[str]]:
    lines: list[str] = []
    cfg = config.load(lora_run_config(tmp, model_dir, name, copies=3, max_steps=2, micro_batch_size=4, **train))
    return train_mod.from_config(cfg, show_progress=False, log=lines.append), lines


def test_eval_before_training_is_reused_by_the_next_run(tmp_path, tiny_model_dir):
    first, lines = _run(tmp_path, tiny_model_dir, "a", lr=1e-2)
    assert any(re.fullmatch(r"eval before training: 4 records, \d+ tokens; about \d+\.\d s", x) for x in lines), lines
    stored = list((tmp_path / cache.FOLDER).glob("eval-before-*.json"))
    assert len(stored) == 1
    second, lines = _run(tmp_path, tiny_model_dir, "b", lr=3e-3)  # only what training changes differs
    assert any(x.startswith(f"eval before training: reused from {stored[0]}") for x in lines), lines
    assert second["eval_before"] == first["eval_before"]
    rows = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "eval_loss" in r]
    assert rows[0]["step"] == 0 and rows[0]["eval_loss"] == first["eval_before"]["eval_loss"]
    # another seed starts another model (a random init for some methods): measured again, stored beside
    _, lines = _run(tmp_path, tiny_model_dir, "c", seed=7)
    assert not any("reused" in x for x in lines)
    assert len(list((tmp_path / cache.FOLDER).glob("eval-before-*.json"))) == 2


def test_a_long_held_out_split_is_capped_and_says_so(tmp_path, tiny_model_dir):
    result, lines = _run(tmp_path, tiny_model_dir, "capped", eval_max_tokens=120)
    said = [x for x in lines if x.startswith("eval: the first")]
    assert len(said) == 1 and "of 4 held-out records" in said[0] and "train.eval_max_tokens=120 (set)" in said[0]
    n = int(said[0].split()[3])
    assert 1 <= n < 4
    scores = (tmp_path / "capped" / "eval" / "scores.json").read_text()
    assert f'"records": {n}' in scores


def test_in_training_evals_show_a_progress_bar(tmp_path, tiny_model_dir, capsys):
    cfg = config.load(lora_run_config(tmp_path, tiny_model_dir, "bar", copies=3, max_steps=1, micro_batch_size=4,
                                      eval_generate=True, eval_max_new_tokens=2))
    train_mod.from_config(cfg, show_progress=True, log=lambda *a: None)
    err = capsys.readouterr().err
    # before and after training: the loss over the 4 held-out records, then their generation
    assert len(re.findall(r"eval loss: 100%.*4/4", err)) == 2 and len(re.findall(r"generate: 100%.*4/4", err)) == 2
    train_mod.from_config(cfg, show_progress=False, log=lambda *a: None, overwrite=True)
    assert "eval loss" not in capsys.readouterr().err


def test_a_bad_eval_max_tokens_is_a_config_error():
    with pytest.raises(config.ConfigError, match=r"train.eval_max_tokens: must be -1 \(auto\), 0 \(all\) or a token"):
        config.load(None, ["train.eval_max_tokens=-2"])
    assert config.load(None, []).train.eval_max_tokens == -1
