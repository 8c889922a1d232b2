"""One host read of the device per optimizer step: on a GPU every .item() / int(t) / float(t) / bool(t) /
.tolist() waits for all queued work, and on a small model (paced by the CPU launching kernels) each wait
leaves the GPU idle. Counted on the CPU by wrapping those methods for the length of each training step."""
from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import lora_run_config
from slimtune import cli
from slimtune.engine.log import read_metrics

STEPS = 4
READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")

# Per-step losses and per-tensor (sum, sum of |x|) of the adapter of the run below, recorded with the loop
# as it was before the reads were cut (commit a5f1bc1: 7 reads a step); the run must train the same numbers.
LOSSES = [6.796885420636433, 6.492899576822917, 6.606947708129883, 6.50727000989412]
PREFIX = 'base_model.model.model.layers.'
ADAPTER = {  # names without PREFIX
    '0.self_attn.q_proj.lora_A.weight': (-0.4658697764389217, 17.93010765640065),
    '0.self_attn.q_proj.lora_B.weight': (-0.2024829614238115, 4.064609194479999),
    '0.self_attn.v_proj.lora_A.weight': (0.6751514282659627, 16.767727266589645),
    '0.self_attn.v_proj.lora_B.weight': (-0.16812414076412097, 2.243825404497329),
    '1.self_attn.q_proj.lora_A.weight': (0.26371315319556743, 15.859402736532502),
    '1.self_attn.q_proj.lora_B.weight': (0.04933772416552529, 4.054726377304178),
    '1.self_attn.v_proj.lora_A.weight': (0.6721508235204965, 16.872625577496365),
    '1.self_attn.v_proj.lora_B.weight': (-0.3320638823788613, 2.1896209090482444),
}


def _config(tmp: Path, model_dir: Path) -> Path:
    """An explicit split (2 records a micro-batch, 2 micro-batches a step) on the tiny model, fp32 on the CPU."""
    return lora_run_config(tmp, model_dir, "run", max_steps=STEPS, micro_batch_size=2, grad_accum=2)


def _cpu_adamw() -> bool:
    """A read by torch's AdamW on the CPU: it reads each parameter's step counter (optimizer._get_value);
    on CUDA build_optimizer takes the fused AdamW, which keeps it on the device."""
    return any(f.filename.endswith(("optim/adam.py", "optim/adamw.py", "optim/optimizer.py"))
               for f in traceback.extract_stack(limit=8))


@contextlib.contextmanager
def counted_reads(monkeypatch, loop):
    """Counts the device reads made inside loop._step (a checkpoint save or an eval is outside it)."""
    inside, reads = [False], []
    for name in READS:
        real = getattr(torch.Tensor, name)

        def wrapper(self, *args, _real=real, _name=name, **kwargs):
            if inside[0] and not _cpu_adamw():
                reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)
    real_step, per_step = loop._step, []

    def step(*args, **kwargs):
        inside[0], start = True, len(reads)
        try:
            return real_step(*args, **kwargs)
        finally:
            inside[0] = False
            per_step.append(reads[start:])
    monkeypatch.setattr(loop, "_step", step)
    yield per_step


@pytest.fixture(scope="module")
def counted_run(tmp_path_factory, tiny_model_dir):
    import slimtune.engine.loop as loop

    tmp = tmp_path_factory.mktemp("reads")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the recorded numbers were computed on one thread
    with pytest.MonkeyPatch.context() as mp, counted_reads(mp, loop) as per_step:
        code = cli.main(["train", str(_config(tmp, tiny_model_dir)), "--no-progress"])
    torch.set_num_threads(threads)
    assert code == 0
    return tmp / "run", per_step


def test_one_device_read_per_optimizer_step(counted_run):
    _, per_step = counted_run
    assert len(per_step) == STEPS
    # the one read: torch.stack([loss sum, grad norm]).tolist() after backward and clip
    assert per_step == [["tolist"]] * STEPS


def test_losses_and_adapter_equal_those_before_the_reads_were_cut(counted_run):
    run, _ = counted_run
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    adapter = {k.removeprefix(PREFIX): v for k, v in load_file(run / "adapter_model.safetensors").items()}
    assert losses == pytest.approx(LOSSES, abs=1e-6)
    assert sorted(adapter) == sorted(ADAPTER)
    for k, (total, size) in ADAPTER.items():
        assert float(adapter[k].double().sum()) == pytest.approx(total, abs=1e-6), k
        assert float(adapter[k].double().abs().sum()) == pytest.approx(size, abs=1e-6), k
