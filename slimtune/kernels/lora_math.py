"""The arithmetic both fused LoRA nodes share (kernels/lora.py over an nn.Linear weight, kernels/qlora.py over
a 4-bit weight dequantized for the matmul): the output from a dense weight, and the bias / A / B gradients.
Only how each node gets its base weight differs, so the formulas live here once.

The adapters are trained in fp32 and multiplied in the compute dtype: each node casts A and B in its forward, again
in the recompute of a checkpointed layer and again in its backward. While an optimizer step's forwards and
backwards run (cast_once(), around engine/step.accumulate) the weights cannot change, so each adapter is cast once
a step and the copy reused: at 8B (LoRA r=16 on 224 layers) about 900 of the step's 1,800 small cast kernels,
which the CPU launches and the GPU waits for (profile of 2026-12-06), are gone. The copies are freed when the
step's last backward ends. Traced inside compiled layers the cast stays in the graph (no cache).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx


# id(adapter) -> (adapter, its cast), in a step; holding the adapter keeps its id from naming another tensor
_STEP: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
ENABLED = True  # cast_once() caches (off: bench/speed.py's diagnostic)


@contextlib.contextmanager
def cast_once() -> Iterator[None]:
    """Inside: each adapter weight cast by `cast` is cast once and reused (the caller guarantees no weight changes
    inside: one optimizer step's forwards and backwards)."""
    global _STEP
    outer, _STEP = _STEP, ({} if ENABLED else None)
    try:
        yield
    finally:
        _STEP = outer


def cast(p: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An adapter weight in `dtype`: the step's one copy inside cast_once(), else a new cast."""
    if torch.compiler.is_compiling() or p.dtype == dtype or _STEP is None:  # traced: first, _STEP never read
        return p.to(dtype)
    hit = _STEP.get(id(p))
    if hit is not None and hit[1].dtype == dtype:
        return hit[1]
    out = p.to(dtype)
    _STEP[id(p)] = (p, out)
    return out


def output(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, xa: torch.Tensor, bc: torch.Tensor,
           scale: float) -> torch.Tensor:
    """x2 @ w^T (+ bias) + scale * xa @ bc^T, all in x2's dtype; xa = x2 @ A^T."""
    y = torch.addmm(bias.to(x2.dtype), x2, w.T) if bias is not None else x2 @ w.T
    return y.addmm_(xa, bc.T, alpha=scale)


def input_grad(g: torch.Tensor, w: torch.Tensor, gxa: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """d loss / d x = g @ w + gxa @ A, (N, in), the adapter's term added in place: torch.addmm(g @ w, ...) would hold
    a second (N, in) tensor beside g @ w while it runs, for down_proj tokens x intermediate (924 MiB at 8B and
    33,792 tokens) at the moment a layer's backward holds the most."""
    return (g @ w).addmm_(gxa, ac)


def adapter_grads(ctx: FunctionCtx, g: torch.Tensor, gxa: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor,
                  a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """(bias, A, B) gradients of a node whose inputs 2, 3, 4 are bias, a, b; None where not asked for.
    g: the output gradient (N, out); gxa: d loss / d (x A^T), (N, r)."""
    need_bias, need_a, need_b = ctx.needs_input_grad[2:5]
    gbias = g.sum(0).to(ctx.bias_dtype) if need_bias and ctx.bias_dtype is not None else None
    ga = (gxa.T @ x2).to(a.dtype) if need_a else None
    gb = (g.T @ xa).mul_(ctx.scale).to(b.dtype) if need_b else None
    return gbias, ga, gb
