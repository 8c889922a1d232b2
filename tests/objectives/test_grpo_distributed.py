"""GRPO on two processes (torchrun, FSDP2, gloo on the CPU): each process samples and trains the G completions of
its own prompts of every micro-batch, and with the same completions (the sampler replaced by one that draws them
from the prompt alone) the losses, rewards, gradient norms and adapter equal one process's; the real sampler runs on
the sharded model."""
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
from slimtune.config import ConfigError, load
from slimtune.engine import grpo_step

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("grpo_train.py")
WORDS = ["Paris", "blue", "seven", "the fox", "water", "sleep", "a dog", "health"]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def _config(tmp: Path, model_dir: Path, name: str, **train: object) -> Path:
    data = tmp / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say something about {w}.", "answer": w}) + "\n" for w in WORDS))
    tree = {"model": {"path": str(model_dir)}, "data": {"train": str(data), "max_len": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {"objective": "grpo", "output_dir": str(tmp / name), "lr": 2e-2, "warmup_steps": 0,
                      "max_steps": 3, "micro_batch_size": 2, "grad_accum": 2, "precision": "fp32", "device": "cpu",
                      "save_every": 0, **train},
            "grpo": {"num_generations": 4, "max_new_tokens": 6, "rewards": ["length", "contains"],
                     "length_target": 2, "length_penalty": 0.25}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _go(cmd: list[str], **extra: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra,
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout + done.stderr


def _two(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(SCRIPT), *args]


def _rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_two_processes_match_one(tmp_path, tiny_model_dir, monkeypatch):
    # one process: grpo_train.py's fixed sampler, in this process (the same code as the script, without its imports)
    monkeypatch.setattr(grpo_step, "sample", load_script(SCRIPT).fixed)
    assert cli.main(["train", str(_config(tmp_path, tiny_model_dir, "one")), "--no-progress"]) == 0
    out = _go(_two("fixed", str(_config(tmp_path, tiny_model_dir, "two")), "--no-progress"))
    assert "FSDP2: 2 processes" in out
    one, two = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm", "reward", "reward_std", "rewards/length/mean", "completion_length",
                    "frac_reward_zero_std", "clip_ratio", "trained_tokens"):
            assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (a["step"], key, a[key], b[key])
    assert all(r["grad_norm"] > 1e-3 for r in one) and one[0]["reward_std"] > 0.1  # the numbers compared move
    wa, wb = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" /
                                                                                 "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-5


def test_sampling_under_fsdp2_when_one_process_ends_first(tmp_path, tiny_model_dir):
    """The real sampler on the sharded model, rank 0's completions ending at their first token while rank 1's go on:
    generation runs as the root's forward (the embeddings are gathered) and the step completes on both."""
    _go(_two("rank0-stops", str(_config(tmp_path, tiny_model_dir, "synced", max_steps=1, grad_accum=1)),
             "--no-progress"), GRPO_DUMP=str(tmp_path))
    (r0,), (r1,) = sorted(tmp_path.glob("rank0-*.pt")), sorted(tmp_path.glob("rank1-*.pt"))
    assert torch.load(r0).shape == (4, 1) and torch.load(r1).shape[0] == 4 and torch.load(r1).shape[1] > 1
    (row,) = _rows(tmp_path / "synced")
    assert row["step"] == 1 and 1.0 < row["completion_length"] <= (4 * 1 + 4 * 6) / 8


def test_what_several_processes_refuse(tiny_model_dir):
    cfg = load(None, [f"model.path={tiny_model_dir}", "train.objective=grpo", "train.micro_batch_size=3"])
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=3 on 2 processes: each process samples the G "
                                          r"completions of whole prompts, .* make it a multiple of 2 \(auto takes 2\)"):
        grpo_step.check_processes(cfg, 2)
    cfg = load(None, [f"model.path={tiny_model_dir}", "train.objective=grpo", "train.micro_batch_size=4",
                      "grpo.steps_per_generation=2"])
    with pytest.raises(ConfigError, match="grpo.steps_per_generation=2 on 2 processes: the completions kept between "
                                          "steps are each process's own"):
        grpo_step.check_processes(cfg, 2)
    grpo_step.check_processes(load(None, ["train.objective=grpo", "train.micro_batch_size=4"]), 2)
