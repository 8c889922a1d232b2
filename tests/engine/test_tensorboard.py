"""TensorBoard event files in the output folder, read back with tensorboard's own event reader."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import lora_run_config
from slimtune import cli
from slimtune.runs.metrics_log import read_metrics


def _config(tmp: Path, model_dir: Path, **train) -> Path:
    return lora_run_config(tmp, model_dir, "run", copies=2, method={"dropout": 0.0},
                           **{"max_steps": 5, "micro_batch_size": 4, "warmup_steps": 0, **train})


def _scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_event_files_hold_the_logged_scalars(tmp_path, tiny_model_dir):
    assert cli.main(["train", str(_config(tmp_path, tiny_model_dir)), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert list(run.glob("events.out.tfevents.*"))
    scalars = _scalars(run)
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/input_tokens_per_s", "train/trained_tokens_per_s",
                "train/trained_tokens", "train/rss_gib", "eval/loss"):
        assert tag in scalars, sorted(scalars)
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    for key in ("loss", "lr", "grad_norm"):
        assert [s for s, _ in scalars[f"train/{key}"]] == [1, 2, 3, 4, 5]
        # TensorBoard stores float32
        assert [v for _, v in scalars[f"train/{key}"]] == [pytest.approx(r[key], rel=1e-6) for r in rows]
    evals = [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert scalars["eval/loss"] == [(0, pytest.approx(evals[0]["eval_loss"], rel=1e-6)),
                                    (5, pytest.approx(evals[1]["eval_loss"], rel=1e-6))]
    assert all(v > 0 for _, v in scalars["train/input_tokens_per_s"] + scalars["train/rss_gib"])


def test_fp16_run_logs_the_loss_scale(tmp_path, tiny_model_dir):
    assert cli.main(["train", str(_config(tmp_path, tiny_model_dir, precision="fp16", max_steps=3)),
                     "--no-progress"]) == 0
    scale = _scalars(tmp_path / "run")["train/loss_scale"]
    assert [s for s, _ in scale] == [1, 2, 3] and all(v >= 1 for _, v in scale)


def test_a_resumed_run_replaces_what_the_crashed_one_logged_after_its_checkpoint(tmp_path, tiny_model_dir,
                                                                                  monkeypatch):
    import slimtune.engine.loop as loop

    real, calls = loop.step, []

    def crash_at_step_5(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise SystemExit("killed")  # step 4 was logged, the newest checkpoint is step 3
        return real(*args, **kwargs)

    cfg = _config(tmp_path, tiny_model_dir, save_every=3, max_steps=6)
    monkeypatch.setattr(loop, "step", crash_at_step_5)
    with pytest.raises(SystemExit):
        cli.main(["train", str(cfg), "--no-progress"])
    run = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
    monkeypatch.setattr(loop, "step", real)
    # TensorBoard reads a folder's event files in name order: the second a writer started, then the host, the pid
    # and a per-process counter compared as text (".10" before ".9"); a resume in a new second sorts after
    time.sleep(max(0.0, 1.05 - (time.time() % 1.0)))
    assert cli.main(["train", str(cfg), "--no-progress", "--resume"]) == 0
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # metrics.jsonl cut back to the checkpoint
    losses = _scalars(run)["train/loss"]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]  # and TensorBoard purged the orphaned step 4
    assert [v for _, v in losses] == [pytest.approx(r["loss"], rel=1e-6) for r in rows]
