"""Precision modes and the fp16 traps caught before training.

| train.precision | frozen base | trainable weights + AdamW state | compute | loss scaling |
|---|---|---|---|---|
| fp32      | fp32 | fp32 | fp32 | - |
| bf16      | bf16 | fp32 | bf16 autocast | - |
| bf16-pure | bf16 | bf16 | bf16 | - |
| fp16      | fp16 | fp32 | fp16 autocast | dynamic (GradScaler) |
| fp16-pure | fp16 | fp16 | fp16 | - (refused unless adam_eps is a normal fp16 number) |
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..errors import SlimtuneError

if TYPE_CHECKING:
    from ..config import Config, TrainConfig

PRECISIONS = ("auto", "fp32", "bf16", "bf16-pure", "fp16", "fp16-pure")
FP16_TINY = float(torch.finfo(torch.float16).tiny)  # 6.1e-05: the smallest normal fp16 number


class PrecisionError(SlimtuneError, ValueError):
    """A precision setting that would train wrongly; the message says why and what to do."""


@dataclass(frozen=True)
class Dtypes:
    name: str
    weights: torch.dtype  # the frozen base
    trainable: torch.dtype  # trainable weights, their gradients and AdamW state
    autocast: torch.dtype | None  # compute dtype under torch.autocast, None = no autocast
    scaler: bool  # dynamic loss scaling (fp16 mixed)


def bf16_supported(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return True  # PyTorch runs bf16 on every CPU (slowly where the CPU lacks bf16 instructions)


def resolve(precision: str, device: str) -> str:
    """auto: bf16 on a GPU that has it, else fp32."""
    if precision != "auto":
        return precision
    return "bf16" if device.startswith("cuda") and bf16_supported(device) else "fp32"


def choose_dtypes(precision: str, device: str, adam_eps: float = 1e-8) -> Dtypes:
    """The dtypes of a run, after refusing the settings that cannot train correctly."""
    name = resolve(precision, device)
    if name.startswith("bf16") and not bf16_supported(device):
        raise PrecisionError(f"train.precision={name}: this GPU ({torch.cuda.get_device_name()}) has no bf16; "
                             "use train.precision=fp16 (mixed, with dynamic loss scaling)")
    if name == "fp16-pure" and not adam_eps >= FP16_TINY:
        stored = float(torch.tensor(adam_eps, dtype=torch.float16))
        raise PrecisionError(
            f"train.precision=fp16-pure keeps AdamW's state in fp16, where train.adam_eps={adam_eps:g} becomes "
            f"{stored:g} (fp16's smallest normal number is {FP16_TINY:.3g}): the update m/(sqrt(v)+eps) then "
            "divides by ~0 for small gradients and blows up. Use train.precision=fp16 (fp32 trainable weights "
            "and optimizer state, fp16 base), or bf16 where the GPU has it, or raise train.adam_eps to >= 1e-4")
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if name == "fp32":
        return Dtypes(name, torch.float32, torch.float32, None, False)
    base = half[name.split("-")[0]]
    if name.endswith("-pure"):
        return Dtypes(name, base, base, None, False)
    return Dtypes(name, base, torch.float32, base, name == "fp16")


def cpu_note(p: Dtypes, device: str) -> str | None:
    """A line for half precision on the CPU, where PyTorch's fp16/bf16 kernels are slower than fp32: mixed fp16
    trained SmolLM2-135M about 10x slower than fp32 (a user's report); the tests' tiny model took 2.3x (fp16) and 1.9x
    (bf16) the time of fp32 for 8 steps on a 2-core AVX512 CPU. None on a GPU or for fp32."""
    if device.startswith("cuda") or p.name == "fp32":
        return None
    return (f"note: train.precision={p.name} on the CPU runs slower than fp32 (PyTorch's CPU half-precision kernels: "
            "mixed fp16 took about 10x the time of fp32 on SmolLM2-135M); train.precision=fp32, what auto picks on "
            "the CPU, is faster there unless memory is what you lack")


def cast_trainable(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Trainable weights in their own dtype (fp32 by default) while the frozen base stays half."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != dtype:
            p.data = p.data.to(dtype)


def autocast(p: Dtypes, device: str) -> contextlib.AbstractContextManager:
    if p.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=p.autocast)


def scaler(p: Dtypes, device: str) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 mixed precision (a disabled no-op otherwise)."""
    return torch.amp.GradScaler(device.split(":")[0], enabled=p.scaler)


def scaler_state(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """[scale, overflow] of an fp16 GradScaler after unscale_(optimizer), as device tensors nothing has read
    (GradScaler.get_scale and .step would each read one): overflow > 0 when a gradient held inf/NaN, which
    skips the step and lowers the scale. On several ranks unscale_'s inf check is already summed over them (DTensor
    all-reduces it)."""
    scale = scaler._get_scale_async()
    found = scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values()
    return [scale, sum(f.to(scale.device) for f in found)]


def base_dtype_name(cfg: Config, device: str, p: Dtypes | None = None) -> str:
    """model.dtype, or the run's base dtype when it is auto: fp32 | bf16 | fp16. p: the run's dtypes
    (default: decided here, for a model loaded outside a run)."""
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    dtype = (p or choose_dtypes(cfg.train.precision, device, cfg.train.adam_eps)).weights
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def gpu_dtypes(tc: TrainConfig) -> Dtypes:
    """A GPU run's dtypes, decided without the GPU (no bf16 check): what an estimate without a run plan counts."""
    name = "bf16" if tc.precision == "auto" else tc.precision  # an estimate is for a GPU
    return choose_dtypes(name, "cpu", tc.adam_eps)
