"""Numeric guards: a NaN or inf loss or gradient stops the run (or skips the step, train.on_nan=skip) with a
message naming the step, the batch's records and the likely cause, and the last checkpoint worth resuming.

Divergence is told apart from a bad record by the trainable weights themselves: with lr=1e38 the first update
made them ~1e38 (still finite), the next forward pass overflowed, and blaming that batch's records was wrong.

fp16 loss scaling is left alone: there, inf gradients are the GradScaler's normal overflow signal (it skips
the step and lowers the scale), so only a non-finite loss counts.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from ..methods.parts import PARTS
from ..runs import checkpoint, sharded
from . import distributed
from .precision import PrecisionError

if TYPE_CHECKING:
    from .state import Run

# Trainable weights whose max |w| passes GROWTH x their max |w| before the first step (at least 1) have
# diverged. Healthy runs stay far below: LoRA's A starts near 1/sqrt(width) and B at 0 and end below 1;
# full fine-tuning moves weights by a few percent. lr=1e38 reached 3.3e37.
GROWTH = 1e3


class NumericError(PrecisionError):
    """A NaN or inf loss or gradient stopped training; the message names step, records and likely cause."""


def nonfinite(loss: float, grad_norm: float, scaling: bool) -> str | None:
    """"loss" or "gradient" when that one holds NaN/inf (gradients only without loss scaling), else None."""
    if not math.isfinite(loss):
        return "loss"
    if not scaling and not math.isfinite(grad_norm):
        return "gradient"
    return None


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a parameter sharded over several (FSDP2's DTensor), else the tensor: each
    rank checks its own part, without gathering the whole."""
    return t.to_local() if hasattr(t, "to_local") else t


def broken_weights(model: torch.nn.Module) -> list[str]:
    """Names of parameters that hold NaN/inf (trainable ones first)."""
    names = [(not p.requires_grad, n) for n, p in model.named_parameters()
             if p.is_floating_point() and not bool(torch.isfinite(local(p)).all())]
    return [n for _, n in sorted(names)]


def max_abs(tensors: Iterable[torch.Tensor]) -> float:
    """The largest |value| over the tensors; NaN or inf as soon as one holds it."""
    top = 0.0
    for t in tensors:
        if local(t).numel():
            # no |t| copy: a 1 GiB embedding stays 1 GiB
            value = float(torch.linalg.vector_norm(local(t).detach(), math.inf))
            if not math.isfinite(value):
                return value
            top = max(top, value)
    return top


def trainable_max(model: torch.nn.Module) -> float:
    return max_abs(p for p in model.parameters() if p.requires_grad)


def diverged(now: float, start: float | None) -> bool:
    """Finite weights far beyond where they started (GROWTH); without a start, only non-finite ones count."""
    if not math.isfinite(now):
        return True
    return start is not None and now > GROWTH * max(start, 1.0)


def likely_cause(what: str, model: torch.nn.Module, precision: str, lr: float, losses: list[float],
                 start: float | None = None) -> str:
    """A best guess at why, most specific first, with what to do. start: the trainable weights' max |w|
    before the first step (trainable_max), which tells divergence from a bad record."""
    broken = broken_weights(model)
    if broken:
        return (f"the weight {broken[0]} already holds NaN/inf ({len(broken)} tensors do): an earlier update "
                "diverged or the weights loaded broken; lower train.lr, or check model.path's files")
    now = trainable_max(model)
    if diverged(now, start):
        return divergence(now, start, lr, "so the forward pass overflowed; the batch's records are not the cause")
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


def divergence(now: float, start: float | None, lr: float, effect: str) -> str:
    """The diagnosis of weights that grew past GROWTH x their start, and what to do."""
    return (f"training diverged: the trainable weights grew to max |w| {now:.3g} from {start or 0:.3g} before the "
            f"first step, {effect}. Lower train.lr (now {lr:g}) or add train.warmup_steps (AdamW moves each weight "
            "by about lr per step whatever the gradient, so train.max_grad_norm does not help)")


def saturated(model: torch.nn.Module, now: float, start: float | None, lr: float, loss: float | None) -> str | None:
    """Why a run that stayed finite must not pass for a trained one: its weights (max |w| `now`, over every
    rank) diverged (lr=1e30 made them ~1e30, after which every token's logits were the same and the loss sat
    at ln(vocab)), or None."""
    if not diverged(now, start):
        return None
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    at = f"{loss:.4f}" if loss is not None else "unknown"
    flat = f" (ln(vocab) = {math.log(vocab):.4f}, a uniform guess)" if vocab else ""
    return divergence(now, start, lr, f"and the last train loss is {at}{flat}: the adapter predicts nothing")


def uniform(model: torch.nn.Module, loss: float | None) -> str | None:
    """A warning when the last train loss is ln(vocab) to 1e-3: every token equally likely, which a trained
    model never predicts (lr=1e30 gave 5.99146 with vocab 400, ln 400 = 5.99146)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not vocab or loss is None or abs(loss - math.log(vocab)) > 1e-3:
        return None
    return (f"warning: the last train loss {loss:.4f} is ln(vocab) = {math.log(vocab):.4f}, the loss of giving every "
            "token the same probability: the model learned nothing it predicts (often train.lr too high); check "
            "the loss curve before using this adapter")


def message(what: str, step: int, value: float, wheres: list[str], cause: str) -> str:
    shown = ", ".join(wheres[:8]) + (f" and {len(wheres) - 8} more" if len(wheres) > 8 else "")
    return f"step {step}: the {what} is {value} (not finite); batch records: {shown}. Likely cause: {cause}."


def checkpoint_max(folder: Path) -> float:
    """max |w| of the trainable weights a checkpoint holds (what a resume loads)."""
    if sharded.present(folder):  # DCP shards: each file holds model.<param> slices among optimizer state
        return max(_file_max(p, "model.") for p in sharded.weight_files(folder))
    return _file_max(folder / (checkpoint.RAW if (folder / checkpoint.RAW).is_file() else PARTS))


def _file_max(path: Path, prefix: str = "") -> float:
    with safe_open(str(path), framework="pt") as fh:
        return max_abs(fh.get_tensor(k) for k in fh.keys() if k.startswith(prefix))


def resume_advice(out_dir: Path, start: float | None, diverging: bool) -> str:
    """Where to go on from: the newest checkpoint whose weights are finite and sane (scanned newest first),
    and the newer ones that are not, which --resume (newest first) would otherwise pick."""
    found = checkpoint.complete(Path(out_dir) / checkpoint.ROOT)
    if not found:
        return "no checkpoint was written yet"
    bad = []
    for _, folder in reversed(found):
        top = checkpoint_max(folder)
        if not diverged(top, start):
            break
        bad.append(f"{folder.name} (max |w| {top:.3g})")
    else:
        return (f"every checkpoint holds diverged weights ({', '.join(bad)}); start again with a lower train.lr "
                "(--overwrite)")
    lower = " train.lr=<lower>" if diverging or bad else ""
    if not bad:
        return (f"the newest checkpoint is {folder} (slimtune train CONFIG --resume{lower} goes on from it; "
                "train.on_nan=skip skips such steps)")
    return (f"the last sane checkpoint is {folder}; the newer {', '.join(reversed(bad))} hold diverged weights, "
            f"so move them out of {folder.parent}, then slimtune train CONFIG --resume{lower} goes on from it")


def final_checks(run: Run) -> None:
    """The end of a run (engine/state.Run): one that skipped too many steps, blew its weights up or ended on
    non-finite numbers fails without its adapter."""
    t, tc = run.tally, run.cfg.train
    if t.nan_steps > tc.max_skipped_share * run.steps:
        raise NumericError(
            f"train.on_nan=skip skipped {t.nan_steps} of {run.steps} steps for a NaN/inf loss or gradient, more "
            f"than train.max_skipped_share={tc.max_skipped_share:g} allows, so the adapter was not saved (the "
            "warnings above name the records and the likely cause); lower train.lr or fix those records (or raise "
            "train.max_skipped_share)")
    top = distributed.all_max([trainable_max(run.model)], run.device)[0]  # each rank holds a shard
    why = saturated(run.model, top, t.start_max_abs, tc.lr, t.train_loss)
    if why:  # finite but blown up (lr=1e30): exit 0 would pass a useless adapter for a trained one
        raise NumericError(f"{why}; the adapter was not saved. "
                                  + resume_advice(run.out_dir, t.start_max_abs, True))
    loss = 0.0 if t.train_loss is None else t.train_loss
    if not math.isfinite(loss):  # its update was skipped, so the weights are the last sane ones
        raise NumericError(f"the last step's loss is {loss} (not finite; train.on_nan=skip skipped its "
                                  "update), and a run that ends on a non-finite loss is not reported as a success: "
                                  f"the adapter was not saved. The checkpoint {checkpoint.latest(run.out_dir)} holds "
                                  "the finite weights before it (chat, merge and eval take that folder)")
