"""Output head + cross-entropy without the full-vocabulary logits.

The plain path keeps fp32 logits of every trained token for backward: about 10.4 bytes x vocab per token
(measured on the H100 grid, bench/results/2026-11-23-h100-memory_grid_1b-v2.jsonl), 20 of the 28 GiB
peak at a 1B Llama with 8 x 4096 tokens. Here rows go through the head a chunk at a time; each chunk's
gradients (softmax - onehot, times the weight) are computed at once in the forward, as Liger-Kernel's
fused linear cross-entropy does, so only a chunk of logits ever exists and backward is one multiply.

Reference: reference.linear_cross_entropy. Same matmuls as the plain path, so no extra FLOPs.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx

# One chunk's fp32 logits take at most this many bytes (plus a half-precision copy): 128 MiB keeps the
# head's matmuls large (261 rows x 128,256 x hidden) while the transient stays near 200 MiB, which
# matters at 1B, where the whole run should fit in under 4 GiB.
CHUNK_BYTES = 2**27
# On CUDA a chunk also takes at most this share of the memory still free (the driver's free memory plus
# what PyTorch's cache holds unused): a long record whose layer inputs fill the GPU gets smaller chunks
# rather than an out-of-memory error in the head. A chunk costs about 2.5 x its fp32 logits at its peak
# (logits, the softmax in place, its half-precision copy, the head's gradient matmul), so an eighth.
FREE_SHARE = 8


def chunk_rows(vocab: int, chunk_bytes: int | None = None) -> int:
    return max(16, (chunk_bytes or CHUNK_BYTES) // (4 * vocab))


def free_bytes(device: torch.device) -> int | None:
    """Memory a chunk could take on `device` without growing the process past what is free; None off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    if hasattr(torch.cuda, "get_per_process_memory_fraction"):  # a cap set_per_process_memory_fraction put
        free = min(free, int(torch.cuda.get_per_process_memory_fraction(device) * total) - reserved)
    return max(0, free) + reserved - torch.cuda.memory_allocated(device)


def sized_rows(vocab: int, device: torch.device) -> int:
    """Rows per chunk: CHUNK_BYTES of fp32 logits, fewer where free memory is short (FREE_SHARE)."""
    free = free_bytes(device)
    return chunk_rows(vocab, CHUNK_BYTES if free is None else max(1, min(CHUNK_BYTES, free // FREE_SHARE)))


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    dev = weight.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype


def _chunks(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, rows: int,
            need: tuple[bool, bool, bool]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None,
                                                     torch.Tensor | None]:
    """The summed loss and, where `need` asks, the gradients of hidden / weight / bias, a chunk at a time."""
    need_h, need_w, need_b = need
    dtype = _compute_dtype(weight)
    with torch.autocast(weight.device.type, enabled=False):
        h, w = hidden.to(dtype), weight.to(dtype)
        b = bias.to(torch.float32) if bias is not None else None
        # gradients are unscaled (|softmax - onehot| <= 1) until backward multiplies by grad_output,
        # so fp16 would lose the small ones: keep them in fp32 there, in the compute dtype otherwise
        gdtype = torch.float32 if dtype == torch.float16 else dtype
        grad_h = torch.empty(h.shape, dtype=gdtype, device=h.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        grad_b = torch.zeros(w.shape[0], dtype=torch.float32, device=w.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], rows):
            hc, tc = h[start:start + rows], targets[start:start + rows]
            logits = (hc @ w.T).float()
            if b is not None:
                logits += b
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            if not (need_h or need_w or need_b):
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            g[torch.arange(len(tc), device=g.device), tc] -= 1.0
            if need_b:
                grad_b += g.sum(0)
            g = g.to(dtype)
            if need_h:
                grad_h[start:start + rows] = g @ w
            if need_w:
                grad_w += g.T @ hc
    return total, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, rows: int) -> torch.Tensor:
        total, grad_h, grad_w, grad_b = _chunks(hidden, weight, bias, targets, rows, ctx.needs_input_grad[:3])
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        hd, wd, bd = ctx.dtypes
        scale = grad_out.float()
        out_h = (grad_h.float() * scale).to(hd) if grad_h is not None else None
        out_w = (grad_w * scale).to(wd) if grad_w is not None else None
        out_b = (grad_b * scale).to(bd) if grad_b is not None else None
        return out_h, out_w, out_b, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None, rows: int | None = None) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets) with fp32 logits, a chunk of
    `rows` rows at a time. hidden (N, H), weight (V, H), targets (N,) all trained (no ignore index)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    rows = max(1, min(rows or sized_rows(weight.shape[0], hidden.device), hidden.shape[0]))
    if not torch.is_grad_enabled():  # evaluation: the loss alone (needs_input_grad would still ask for grads)
        return _chunks(hidden, weight, bias, targets, rows, (False, False, False))[0]
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, rows)


def fits(head: torch.nn.Module) -> bool:
    """The head is a plain Linear (not a peft adapter layer or a quantized one), so its weight is all."""
    return type(head) is torch.nn.Linear and head.weight.dtype.is_floating_point and math.prod(head.weight.shape) > 0
