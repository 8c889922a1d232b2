"""train.packing=on through the whole loop on the CPU: bins of records per micro-batch, eval on padded batches
alongside, prompt methods refused, and a stopped packed run that resumes bit-identically."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import lora_run_config
from slimtune import cli
from slimtune.runs import checkpoint
from slimtune.runs.metrics_log import read_metrics

STEPS = 10


def _config(tmp: Path, model_dir: Path, name: str, **train) -> Path:
    """28 training records of ~52 tokens; bins of at most 2 x 64 tokens hold 2 or 3 of them (14 bins an
    epoch), so 10 steps of 2 micro-batches cross into a second, newly packed epoch; LoRA dropout on, so
    its RNG must resume too."""
    return lora_run_config(tmp, model_dir, name, **{"max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2,
                                                    "packing": "on", **train})


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def packed_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("packed")
    assert cli.main(["train", str(_config(tmp, tiny_model_dir, "ref")), "--no-progress"]) == 0
    return tmp / "ref"


def test_packed_run_trains_on_full_rows(packed_run, capsys):
    rows = [r for r in read_metrics(packed_run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert rows[-1]["loss"] < rows[0]["loss"]
    evals = [r["eval_loss"] for r in read_metrics(packed_run / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) == 2 and evals[1] < evals[0]  # eval (padded batches) works with packed attention on


def test_packing_refused_for_prompt_methods(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, "run")
    assert cli.main(["train", str(cfg), "method.name=prompt_tuning", "--no-progress"]) == 2
    assert "train.packing: on does not work with method.name=prompt_tuning" in capsys.readouterr().err


def test_stopped_packed_run_resumes_bit_identically(tmp_path, tiny_model_dir, packed_run, monkeypatch, capsys):
    import slimtune.engine.loop as loop

    real, calls = loop.step, []

    def signalled_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-step
        return real(*args, **kwargs)

    cfg = _config(tmp_path, tiny_model_dir, "run")
    monkeypatch.setattr(loop, "step", signalled_step)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 143  # stopped by SIGTERM, not finished
    monkeypatch.setattr(loop, "step", real)
    run = tmp_path / "run"
    assert [p.name for p in (run / checkpoint.ROOT).iterdir()] == ["step-000004"]
    out = capsys.readouterr().out
    assert "packing: 28 records in" in out and "one SDPA call per record" in out

    assert cli.main(["train", str(cfg), "train.packing=off", "--resume", "--no-progress"]) == 2
    assert "train.packing: 'on' there, 'off' now" in capsys.readouterr().err
    assert cli.main(["train", str(cfg), "--resume", "--no-progress"]) == 0
    assert _losses(run) == _losses(packed_run)  # every step, each loss bit-identical
    got, want = load_file(run / "adapter_model.safetensors"), load_file(packed_run / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
