"""A preference run killed (SIGKILL) at a random step and resumed gives every step's loss and metrics and the
final weights bit-identical to an uninterrupted run (fp32 on the CPU), for the adapter-off reference (LoRA with
dropout: the RNG must resume) and the precomputed one (full fine-tuning: the reference file is read back)."""
from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtune.runs.metrics_log import read_metrics
from slimtune.engine.reference import REFERENCE_FILE

STEPS = 10
SCRIPT = Path(__file__).with_name("pref_train.py")
METHODS = {"lora": ({"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
                    "adapter_model.safetensors"),
           "full": ({"name": "full"}, "slimtune_parts.safetensors")}


def _config(tmp: Path, model_dir: Path, name: str, method: str) -> Path:
    data = tmp / "pairs.jsonl"  # named for the run's checks; pref_train.py makes the records
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    tree = {"model": {"path": str(model_dir)}, "data": {"train": str(data), "max_len": 64},
            "method": METHODS[method][0],
            "train": {"output_dir": str(tmp / name), "objective": "dpo", "lr": 1e-2 if method == "lora" else 1e-3,
                      "warmup_steps": 2, "max_steps": STEPS, "micro_batch_size": 2, "grad_accum": 2,
                      "save_every": 1, "keep_checkpoints": 2, "eval_every": 4, "precision": "fp32",
                      "device": "cpu", "scheduler": "cosine"},
            "preference": {"beta": 0.5}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _train(cfg: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(SCRIPT), str(cfg), "--no-progress", *extra], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _rows(run: Path) -> list[dict]:
    drop = ("elapsed_s", "input_tokens_per_s", "trained_tokens_per_s", "step_s", "host_s", "data_s", "gc_s",
            "alloc_retries", "device_allocs", "rss_gib", "time")
    return [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(run / "metrics.jsonl")]


def _logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((int(m) for m in re.findall(r'"step": (\d+), "lr"', path.read_text())), default=0)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tiny_model_dir, method):
    target = random.Random().randint(3, 7)
    ref = _train(_config(tmp_path, tiny_model_dir, "ref", method))
    victim = _train(_config(tmp_path, tiny_model_dir, "killed", method))
    run = tmp_path / "killed"
    deadline = time.monotonic() + 240
    while _logged_step(run) < target:
        assert victim.poll() is None, victim.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    out, _ = ref.communicate(timeout=240)
    assert ref.returncode == 0, out
    resumed = _train(tmp_path / "killed.yaml", "--resume")
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out
    assert re.search(r"resuming from \S+step-(\d+) at step (\d+) of 10", out), out
    if method == "full":  # the precomputed reference came back from the run folder, not from the trained weights
        assert f"reference log-probabilities read from {run / REFERENCE_FILE}" in out, out
    expected = _rows(tmp_path / "ref")
    assert [r["step"] for r in expected if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in expected if "eval_loss" in r] == [0, 4, 8, 10]  # eval_at_start, every 4, the end
    assert all("rewards/accuracy" in r for r in expected if "loss" in r)
    assert _rows(run) == expected  # every row once, each number bit-identical
    name = METHODS[method][1]
    got, want = load_file(run / name), load_file(tmp_path / "ref" / name)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
