"""Plain-PyTorch twins of the fast ops in this folder: the CPU path and what the tests compare against."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over rows of cross_entropy(hidden @ weight.T + bias, targets), logits in fp32."""
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor | list[int],
                     scale: float | None = None, dropout: float = 0.0, window: int | None = None) -> torch.Tensor:
    """Causal attention within each record of a packed row, never across: one SDPA call per record.

    query (1, H, T, D), key/value (1, H_kv, T, D) with H a multiple of H_kv; records start at cu_seq_lens
    (N + 1 offsets: a tensor, or host ints). window: each token sees itself and the window - 1 tokens before
    it. -> (1, H, T, D).
    """
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # query head h reads kv head h // groups, as transformers' repeat_kv
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    bounds = [int(b) for b in (cu_seq_lens.tolist() if isinstance(cu_seq_lens, torch.Tensor) else cu_seq_lens)]
    parts = []
    for a, b in zip(bounds, bounds[1:]):
        if b == a:
            continue
        mask = None
        if window and b - a > window:
            i = torch.arange(b - a, device=query.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)
        parts.append(F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], attn_mask=mask,
                                                    dropout_p=dropout, is_causal=mask is None, scale=scale))
    return torch.cat(parts, dim=2)


def dequantize_nf4(packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """bitsandbytes' 4-bit weight (two codes a byte, the first in the high nibble) as the (out, in) tensor it
    stands for: code[nibble] x the absmax of its block; with double quantization the absmax are themselves
    8-bit codes x a second level of absmax, plus an offset (bitsandbytes' QuantState.state2)."""
    absmax = state.absmax
    if state.nested:
        s2 = state.state2
        block = torch.arange(absmax.numel(), device=absmax.device) // s2.blocksize
        absmax = s2.code[absmax.long()] * s2.absmax[block] + state.offset
    flat = packed.reshape(-1)
    codes = torch.stack([flat >> 4, flat & 0xF], dim=-1).reshape(-1).long()
    n = math.prod(state.shape)
    block = torch.arange(n, device=packed.device) // state.blocksize
    return (state.code[codes[:n]] * absmax.float()[block]).to(state.dtype).reshape(state.shape)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """x @ weight.T + bias + scale * (x @ a.T) @ b.T, one op at a time (kernels/lora.py, qlora.py fuse it)."""
    return F.linear(x, weight, bias) + scale * F.linear(F.linear(x, a), b)


def swiglu_mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """The Llama-family MLP on the whole sequence at once: down(silu(x gate^T) * (x up^T)); what
    kernels/tiled_mlp.py computes a slice at a time."""
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)
