"""Training with the caller's own loss, for models whose forward returns no language-model loss (a BERT
span extractor, a classifier, the user's own module): AdamW over the trainable parameters with
train.lr / scheduler / warmup_steps / grad_accum / max_grad_norm, in plain PyTorch.

No checkpoints, packing or evaluation here: the batches are the caller's and so is what they mean.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch

from ..config import Config, TrainConfig
from ..config.convert import AUTO
from ..data.readers import DataError
from . import guards, precision
from .optim import build_optimizer, build_scheduler

LossFn = Callable[[torch.nn.Module, dict], torch.Tensor]


def _cycle(batches: Iterable[dict]) -> Iterator[dict]:
    while True:  # epochs over the caller's batches, in the caller's order
        yield from batches


def _to(batch: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss(loss_fn: LossFn, model: torch.nn.Module, batch: dict, step: int) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        raise DataError(f"fit: step {step}: loss_fn returned {type(loss).__name__}"
                        + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                        + "; it must return the batch's loss as a scalar tensor (e.g. a mean)")
    return loss


def accum(tc: TrainConfig) -> int:
    """Batches a step: train.grad_accum; auto is 1 (the batches are the caller's, their size is theirs)."""
    return 1 if tc.grad_accum == AUTO else tc.grad_accum


def steps_for(n_batches: int, tc: TrainConfig) -> int:
    """train.max_steps, else train.epochs passes over the batches, grad_accum batches a step."""
    return tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(n_batches / accum(tc) * tc.epochs))


def fit(model: torch.nn.Module, batches: Iterable[dict], cfg: Config, loss_fn: LossFn, device: str = "cpu",
        log: Callable[[str], None] = print) -> dict:
    """Train `model` on dict batches with loss_fn(model, batch) -> scalar; returns {"losses", "steps",
    "train_loss", "train_seconds"}. Each step's loss is the mean over its grad_accum batches."""
    tc = cfg.train
    batches = batches if hasattr(batches, "__len__") else list(batches)  # a generator is read once
    if len(batches) == 0:
        raise DataError("fit: data holds no batch; give a list (or DataLoader) of dict batches")
    steps = steps_for(len(batches), tc)
    plan = precision.choose_dtypes(tc.precision, device, tc.adam_eps)
    torch.manual_seed(tc.seed)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, steps, tc)
    scaler = precision.scaler(plan, device)  # a no-op except for fp16 mixed precision
    params = [p for p in model.parameters() if p.requires_grad]
    stream, losses, start = _cycle(batches), [], time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        total = 0.0
        for _ in range(accum(tc)):
            with precision.autocast(plan, device):
                loss = _loss(loss_fn, model, _to(next(stream), device), step) / accum(tc)
            scaler.scale(loss).backward()
            total += float(loss.detach())
        scaler.unscale_(optimizer)  # clip the true gradients
        norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm if tc.max_grad_norm > 0 else math.inf)
        bad = guards.nonfinite(total, float(norm), scaler.is_enabled())
        if bad:  # stop before the update would write NaN into every trained weight
            raise guards.NumericError(f"fit: step {step}: the {bad} is not finite (loss {total}); nothing was "
                                      "updated at this step; lower train.lr or check what loss_fn computes")
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        if step % tc.log_every == 0 or step == steps:
            log(f"step {step}/{steps}: loss {total:.4f}, grad norm {float(norm):.3f}, "
                f"lr {scheduler.get_last_lr()[0]:.2e}")
    return {"losses": losses, "steps": steps, "train_loss": losses[-1],
            "train_seconds": time.perf_counter() - start}
