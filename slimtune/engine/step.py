"""One optimizer step of next-token training over accumulated micro-batches, and the context each forward runs
in (autocast, activation offload): what engine/loop.py's run calls every step, and what a user driving the
engine step by step calls."""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from ..data.readers import DataError
from ..kernels.lora_math import cast_once
from . import distributed, guards, precision
from .loss import token_loss_sum
from .offload import OffloadActivations

Context = Callable[[], contextlib.AbstractContextManager]  # wraps a forward


def trained_tokens(batches: list[dict[str, torch.Tensor]]) -> int:
    """Trained tokens of collated batches (reads the device; the loop counts its records on the host)."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


def accumulate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]],
               context: Context = contextlib.nullcontext, scaler: torch.amp.GradScaler | None = None,
               chunked: bool = False, n_tokens: int | None = None, scale: float = 1.0,
               unread: bool = False) -> tuple[float | torch.Tensor, int | torch.Tensor]:
    """Backward over micro-batches so the gradient is that of the mean loss over all their answer tokens.
    `context` wraps each forward (autocast, activation offload); `scaler` scales fp16 losses; chunked:
    the head and loss a chunk of rows at a time (engine/loss.py). Several processes: n_tokens is the
    step's count over all ranks and scale the number of ranks (FSDP averages gradients over ranks, so
    the sum over every rank's tokens divided by the global count is what arrives).
    unread=True: the mean loss comes back as a float64 device tensor that nothing has read (and, without
    n_tokens, the count too), so the step reads the device once, after its backward and clip."""
    if n_tokens is None:
        n_tokens = sum((b["labels"][:, 1:] != -100).sum() for b in batches) if unread else trained_tokens(batches)
    if isinstance(n_tokens, int) and n_tokens == 0:
        raise DataError("a training step has no trained token (every label is -100)")
    total = None
    with cast_once():  # the fused LoRA nodes cast each adapter once for all of them (kernels/lora_math.py)
        for b in batches:
            with context():
                s, _ = token_loss_sum(model, b, chunked)
            loss = s * scale / n_tokens if scale != 1.0 else s / n_tokens  # the step's tokens: exact accumulation
            (scaler.scale(loss) if scaler is not None else loss).backward()
            # summed on the device in float64: the very additions of the Python floats each .item() once gave
            total = s.detach().double() if total is None else total + s.detach().double()
    return (total / n_tokens, n_tokens) if unread else (total.item() / n_tokens, n_tokens)


def step(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
         scheduler: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float,
         context: Context = contextlib.nullcontext, scaler: torch.amp.GradScaler | None = None, guard: bool = False,
         chunked: bool = False, n_tokens: int | None = None) -> dict:
    """One optimizer step over accumulated micro-batches; with fp16 loss scaling an overflow skips it.
    guard=True: a NaN/inf loss or gradient skips the update and is reported as row["nonfinite"].
    Several processes: n_tokens is the step's trained-token count over all ranks. The device is read once,
    after backward and clip (loss, gradient norm and the fp16 scaler's state in one transfer): each read
    makes the CPU wait for every queued kernel, and a small model's step is paced by the CPU launching them."""
    world = distributed.size()
    loss, count = accumulate(model, batches, context, scaler, chunked, n_tokens, float(world), unread=True)
    distributed.all_sum_(loss)  # each rank's part of the mean
    read = clip_and_read(optimizer, max_grad_norm, scaler, loss,
                         [count] if isinstance(count, torch.Tensor) else [])
    n_tokens = int(read[-1]) if isinstance(count, torch.Tensor) else count
    if n_tokens == 0:  # counted on the device: known only now, before any update
        optimizer.zero_grad(set_to_none=True)
        raise DataError("a training step has no trained token (every label is -100)")
    return apply_update(optimizer, scheduler, scaler, read, {"loss": read[0], "trained_tokens": n_tokens}, guard)


def clip_and_read(optimizer: torch.optim.Optimizer, max_grad_norm: float,
                  scaler: torch.amp.GradScaler | None, loss: torch.Tensor,
                  extra: list[torch.Tensor] | None = None) -> list[float]:
    """Unscale (fp16 loss scaling) and clip the accumulated gradients, then read the device once: [loss, gradient
    norm, (loss scale, overflow) when scaling, *extra] as floats. Each read makes the CPU wait for every queued
    kernel, and a small model's step is paced by the CPU launching them."""
    scaling = scaler is not None and scaler.is_enabled()
    if scaling:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
    # the optimizer's parameters are the trained ones: no walk over every module each step, host time a
    # host-paced GPU step waits for
    params = [p for group in optimizer.param_groups for p in group["params"]]
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = distributed.grad_norm(params, limit) if distributed.size() > 1 else \
        torch.nn.utils.clip_grad_norm_(params, limit)
    parts = [loss, norm.to(loss.device)] + (precision.scaler_state(scaler, optimizer) if scaling else []) \
        + list(extra or [])
    return torch.stack([t.double() for t in parts]).tolist()


def apply_update(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 scaler: torch.amp.GradScaler | None, read: list[float], row: dict, guard: bool = True) -> dict:
    """The update from clip_and_read's numbers: guard=True skips it on a NaN/inf loss or gradient (reported as
    row["nonfinite"]); an fp16 overflow skips it too (the scaler lowers its scale); the schedule always steps.
    `row` gets the gradient norm and the scaler's state."""
    scaling = scaler is not None and scaler.is_enabled()
    bad = guards.nonfinite(read[0], read[1], scaling) if guard else None
    if scaling:
        scale, overflow = read[2], read[3] > 0
        if bad is None and not overflow:
            optimizer.step()  # what scaler.step does once unscale_ found no inf/NaN, without reading that again
        scaler.update()  # an overflow lowers the scale: the step was skipped
        row.update(loss_scale=scale, skipped=overflow)
    elif bad is None:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    row["grad_norm"] = read[1]
    if bad:
        row["nonfinite"] = bad
    return row


def forward_context(p: precision.Dtypes, device: str, offload: bool, model: torch.nn.Module | None = None,
                    max_tokens: int = 0) -> Context:
    """Autocast per the precision plan, plus saved activations kept in CPU memory when asked (engine/offload.py;
    `model`'s parameters are never copied out; max_tokens: the most tokens a micro-batch can hold, which sizes
    its reused host buffers)."""
    hooks = OffloadActivations(model, max_tokens=max_tokens) if offload else None

    def context() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(precision.autocast(p, device))
        if hooks is not None:
            stack.enter_context(hooks)
        return stack
    return context
