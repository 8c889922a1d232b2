"""The arithmetic both fused LoRA nodes share (kernels/lora.py over an nn.Linear weight, kernels/qlora.py over
a 4-bit weight dequantized for the matmul): the output from a dense weight, and the bias / A / B gradients.
Only how each node gets its base weight differs, so the formulas live here once."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx


def output(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, xa: torch.Tensor, bc: torch.Tensor,
           scale: float) -> torch.Tensor:
    """x2 @ w^T (+ bias) + scale * xa @ bc^T, all in x2's dtype; xa = x2 @ A^T."""
    y = torch.addmm(bias.to(x2.dtype), x2, w.T) if bias is not None else x2 @ w.T
    return y.addmm_(xa, bc.T, alpha=scale)


def adapter_grads(ctx: FunctionCtx, g: torch.Tensor, gxa: torch.Tensor, x2: torch.Tensor, xa: torch.Tensor,
                  a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """(bias, A, B) gradients of a node whose inputs 2, 3, 4 are bias, a, b; None where not asked for.
    g: the output gradient (N, out); gxa: d loss / d (x A^T), (N, r)."""
    need_bias, need_a, need_b = ctx.needs_input_grad[2:5]
    gbias = g.sum(0).to(ctx.bias_dtype) if need_bias and ctx.bias_dtype is not None else None
    ga = (gxa.T @ x2).to(a.dtype) if need_a else None
    gb = (g.T @ xa).mul_(ctx.scale).to(b.dtype) if need_b else None
    return gbias, ga, gb
