"""DPO on two processes (torchrun, FSDP2, gloo on the CPU) gives the losses, metrics and adapter of one process for
the same records per step: each rank trains its share of every micro-batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import load_script
from slimtune import cli
from slimtune.engine import preflight

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("pref_train.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _config(tmp: Path, model_dir: Path, name: str) -> Path:
    data = tmp / "pairs.jsonl"  # named for the run's checks; pref_train.py makes the records
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    tree = {"model": {"path": str(model_dir)}, "data": {"train": str(data), "max_len": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {"output_dir": str(tmp / name), "objective": "dpo", "lr": 1e-2, "warmup_steps": 0,
                      "max_steps": 5, "micro_batch_size": 3, "grad_accum": 2, "precision": "fp32", "device": "cpu",
                      "eval_every": 0, "eval_at_start": False},
            "preference": {"beta": 0.5}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _go(cmd: list[str]) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_two_processes_match_one(tmp_path, tiny_model_dir, monkeypatch):
    # one process: pref_train.py's records, in this process (the same code as the script, without its imports)
    monkeypatch.setattr(preflight, "build_pairs", load_script(SCRIPT).built)
    assert cli.main(["train", str(_config(tmp_path, tiny_model_dir, "one")), "--no-progress"]) == 0
    out = _go([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT),
               str(_config(tmp_path, tiny_model_dir, "two")), "--no-progress"])
    assert "FSDP2: 2 processes" in out
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4, 5]
    for a, b in zip(one, two):
        for key in ("loss", "rewards/margins", "rewards/accuracy", "logps/chosen", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert one[-1]["loss"] < one[0]["loss"] - 0.1
    wa, wb = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" /
                                                                                 "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5
