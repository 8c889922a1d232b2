"""The training loop, in plain PyTorch: shuffled micro-batches, gradient accumulation, AdamW, schedule."""
from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Iterator

import torch

from ..data.collate import collate
from ..data.encode import Encoded
from ..evaluate.perplexity import eval_loss
from .loss import token_loss_sum
from .log import MetricsLog, progress
from . import precision
from .optim import build_optimizer, build_scheduler
from .precision import Plan


def micro_batches(records: list[Encoded], size: int, seed: int) -> Iterator[list[Encoded]]:
    """Endless micro-batches: every epoch a new seeded shuffle, every record once per epoch."""
    epoch = 0
    while True:
        order = list(range(len(records)))
        random.Random(seed + epoch).shuffle(order)
        for i in range(0, len(order), size):
            yield [records[j] for j in order[i:i + size]]
        epoch += 1


def total_steps(n_records: int, cfg_train) -> int:
    if cfg_train.max_steps > 0:
        return cfg_train.max_steps
    per_epoch = math.ceil(n_records / (cfg_train.micro_batch_size * cfg_train.grad_accum))
    return max(1, math.ceil(per_epoch * cfg_train.epochs))


def accumulate(model, batches: list[dict[str, torch.Tensor]], context=contextlib.nullcontext,
               scaler: torch.amp.GradScaler | None = None) -> tuple[float, int]:
    """Backward over micro-batches so the gradient is that of the mean loss over all their answer tokens.
    `context` wraps each forward (autocast, activation offload); `scaler` scales fp16 losses."""
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    if n_tokens == 0:
        raise RuntimeError("a training step has no trained token (every label is -100)")
    total = 0.0
    for b in batches:
        with context():
            s, _ = token_loss_sum(model, b)
        loss = s / n_tokens  # dividing by the step's token count keeps accumulation exact
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += s.detach().item()
    return total / n_tokens, n_tokens


def step(model, batches: list[dict[str, torch.Tensor]], optimizer, scheduler, max_grad_norm: float,
         context=contextlib.nullcontext, scaler: torch.amp.GradScaler | None = None) -> dict:
    """One optimizer step over accumulated micro-batches; with fp16 loss scaling an overflow skips it."""
    loss, n_tokens = accumulate(model, batches, context, scaler)
    params = [p for p in model.parameters() if p.requires_grad]
    row = {"loss": loss, "tokens": n_tokens}
    if scaler is not None and scaler.is_enabled():
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped when the gradients hold inf/nan
        scaler.update()
        row.update(loss_scale=scale, skipped=scaler.get_scale() < scale)
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    row["grad_norm"] = float(norm)
    return row


def forward_context(p: Plan, device: str, offload: bool):
    """Autocast per the precision plan, plus saved activations kept in CPU memory when asked."""
    def context():
        stack = contextlib.ExitStack()
        stack.enter_context(precision.autocast(p, device))
        if offload:
            stack.enter_context(torch.autograd.graph.save_on_cpu(pin_memory=device.startswith("cuda")))
        return stack
    return context


def fit(model, train: list[Encoded], held: list[Encoded], cfg, pad: int, out_dir: Path, device: str,
        log=print, show_progress: bool = True, plan: Plan | None = None) -> dict:
    """Train for the configured steps; eval before (optionally) and after; metrics go to metrics.jsonl."""
    tc = cfg.train
    plan = plan or precision.plan(tc.precision, device, tc.adam_eps)
    torch.manual_seed(tc.seed)
    steps = total_steps(len(train), tc)
    optimizer = build_optimizer(model, tc)
    scheduler = build_scheduler(optimizer, steps, tc)
    scaler = precision.scaler(plan, device)
    context = forward_context(plan, device, tc.offload_activations)
    metrics = MetricsLog(out_dir / "metrics.jsonl")
    result: dict = {"steps": steps, "precision": plan.name, "skipped_steps": 0}
    cuda = device.startswith("cuda")
    if held and tc.eval_at_start:
        result["eval_before"] = eval_loss(model, held, pad, tc.micro_batch_size, device, context)
        metrics.write(step=0, **result["eval_before"])
        log(f"eval loss before training: {result['eval_before']['eval_loss']:.4f}")
    model.train()
    stream = micro_batches(train, tc.micro_batch_size, tc.seed)
    bar = progress(steps, show_progress)
    start, seen = time.perf_counter(), 0
    for i in range(steps):
        batches = [{k: v.to(device) for k, v in collate(next(stream), pad).items()} for _ in range(tc.grad_accum)]
        seen += sum(int(b["attention_mask"].sum()) for b in batches)
        row = step(model, batches, optimizer, scheduler, tc.max_grad_norm, context, scaler)
        result["skipped_steps"] += int(row.pop("skipped", False))
        elapsed = time.perf_counter() - start
        row.update(step=i + 1, lr=scheduler.get_last_lr()[0], tokens_per_s=seen / elapsed, elapsed_s=elapsed)
        if plan.scaler:
            row["skipped_steps"] = result["skipped_steps"]  # each one an fp16 overflow
        if cuda:
            row["mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if (i + 1) % tc.log_every == 0 or i + 1 == steps:
            metrics.write(**row)
        post = dict(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if cuda:
            post["mem"] = f"{row['mem_gib']:.1f}G"
        if plan.scaler:
            post["scale"] = f"{row['loss_scale']:.0f}"
        bar.set_postfix(**post, refresh=False)
        bar.update(1)
        result["train_loss"] = row["loss"]
    bar.close()
    result["train_seconds"] = time.perf_counter() - start
    result["tokens_per_s"] = seen / max(result["train_seconds"], 1e-9)
    if plan.scaler:
        log(f"fp16 loss scaling: final scale {scaler.get_scale():.0f}, {result['skipped_steps']} of {steps} "
            "steps skipped for overflow")
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if held:
        result["eval_after"] = eval_loss(model, held, pad, tc.micro_batch_size, device, context)
        metrics.write(step=steps, **result["eval_after"])
        before = result.get("eval_before", {}).get("eval_loss")
        change = f" (before: {before:.4f}, {100 * (result['eval_after']['eval_loss'] / before - 1):+.1f}%)" \
            if before else ""
        log(f"eval loss after training: {result['eval_after']['eval_loss']:.4f}{change}")
    metrics.close()
    return result
