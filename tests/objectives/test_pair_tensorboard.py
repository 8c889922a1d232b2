"""A preference run's rewards in TensorBoard: every rewards/* and logps/* key of metrics.jsonl as a train/ scalar,
the held-out ones as eval/ scalars, read back with tensorboard's own event reader."""
from __future__ import annotations

import pref_train
import pytest

from slimtune import cli
from slimtune.engine import preflight
from slimtune.runs.metrics_log import read_metrics
from test_pair_training import _run_config, dpo_run

KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen", "logps/rejected")


def _scalars(run) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_rewards_reach_tensorboard_as_logged(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    dpo_run(run, steps=4)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    scalars = _scalars(run)
    for key in KEYS:  # TensorBoard stores float32
        assert scalars[f"train/{key}"] == [(r["step"], pytest.approx(r[key], rel=1e-6, abs=1e-7)) for r in rows], key
    assert [s for s, _ in scalars["train/rewards/margins"]] == [1, 2, 3, 4]


def test_held_out_rewards_reach_tensorboard_as_eval_scalars(tmp_path, tiny_model_dir, monkeypatch):
    pytest.importorskip("tensorboard")
    monkeypatch.setattr(preflight, "build_pairs", pref_train.built)
    assert cli.main(["train", _run_config(tmp_path, tiny_model_dir), "--no-progress"]) == 0
    run = tmp_path / "run"
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    scalars = _scalars(run)
    for key in ("rewards/accuracy", "rewards/margins"):
        assert scalars[f"eval/{key}"] == [(r["step"], pytest.approx(r[f"eval_{key}"], rel=1e-6, abs=1e-7))
                                          for r in evals], key
    assert [s for s, _ in scalars["eval/rewards/accuracy"]] == [0, 6]
