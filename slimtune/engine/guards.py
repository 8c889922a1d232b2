"""Numeric guards: a NaN or inf loss or gradient stops the run (or skips the step, train.on_nan=skip) with a
message naming the step, the batch's records and the likely cause.

fp16 loss scaling is left alone: there, inf gradients are the GradScaler's normal overflow signal (it skips
the step and lowers the scale), so only a non-finite loss counts.
"""
from __future__ import annotations

import math

import torch

from .precision import PrecisionError


class NumericError(PrecisionError):
    """A NaN or inf loss or gradient stopped training; the message names step, records and likely cause."""


def nonfinite(loss: float, grad_norm: float, scaling: bool) -> str | None:
    """"loss" or "gradient" when that one holds NaN/inf (gradients only without loss scaling), else None."""
    if not math.isfinite(loss):
        return "loss"
    if not scaling and not math.isfinite(grad_norm):
        return "gradient"
    return None


def broken_weights(model) -> list[str]:
    """Names of parameters that hold NaN/inf (trainable ones first)."""
    names = [(not p.requires_grad, n) for n, p in model.named_parameters()
             if p.is_floating_point() and not bool(torch.isfinite(p).all())]
    return [n for _, n in sorted(names)]


def likely_cause(what: str, model, precision: str, lr: float, losses: list[float]) -> str:
    """A best guess at why, most specific first, with what to do."""
    broken = broken_weights(model)
    if broken:
        return (f"the weight {broken[0]} already holds NaN/inf ({len(broken)} tensors do): an earlier update "
                "diverged or the weights loaded broken; lower train.lr, or check model.path's files")
    if precision.startswith("fp16"):
        return ("fp16 overflow: a value in the forward pass passed fp16's maximum of 65504; use "
                "train.precision=bf16 where the GPU has it, or fp32")
    if what == "gradient":
        return (f"the gradient overflowed while the loss stayed finite: lower train.lr (now {lr:g}) or set "
                "train.max_grad_norm")
    if len(losses) >= 2 and losses[-1] > 2 * min(losses):
        return (f"training diverged (the loss rose from {min(losses):.4g} to {losses[-1]:.4g}): lower train.lr "
                f"(now {lr:g}), add train.warmup_steps or set train.max_grad_norm")
    return ("the forward pass made a NaN/inf from finite weights: check these records (unusual or very long "
            "inputs) and the base model (model.path)")


def message(what: str, step: int, value: float, wheres: list[str], cause: str) -> str:
    shown = ", ".join(wheres[:8]) + (f" and {len(wheres) - 8} more" if len(wheres) > 8 else "")
    return f"step {step}: the {what} is {value} (not finite); batch records: {shown}. Likely cause: {cause}."
