"""Log-probabilities of the answer tokens, summed per sequence, without the logits of all tokens at once.

The output head runs on the rows of trained positions a chunk at a time, each chunk under activation
checkpointing: only one chunk's fp32 logits exist in forward, and backward recomputes that chunk's alone, so the
peak is a chunk of logits (kernels/linear_ce.py sizes it) instead of tokens x vocabulary. Same matmuls as the
plain path (reference: `plain_token_logps`), plus the head's forward once more in backward.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from ..kernels import linear_ce
from ..kernels.linear_ce import sized_rows


def _row_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
               targets: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)


def plain_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of every row (N,), with all N x vocabulary logits at once: the reference."""
    return _row_logps(hidden, weight, bias, targets)


def token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                rows: int | None = None) -> torch.Tensor:
    """log p(target) of every row (N,) of hidden (N, H) under the head (weight (V, H), bias), `rows` rows a time."""
    rows = max(1, rows or sized_rows(weight.shape[0], hidden.device))
    if hidden.shape[0] <= rows:
        return _row_logps(hidden, weight, bias, targets)
    parts = []
    for start in range(0, hidden.shape[0], rows):
        h, t = hidden[start:start + rows], targets[start:start + rows]
        if torch.is_grad_enabled():
            parts.append(checkpoint(_row_logps, h, weight, bias, t, use_reentrant=False))
        else:
            parts.append(_row_logps(h, weight, bias, t))
    return torch.cat(parts)


def head_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float = 1.0,
               chunked: bool = True) -> torch.Tensor:
    """log p(target) of every row (N,) of hidden (N, H) under the output head at `temperature` (logits / T: the head
    applied to hidden / T, its bias / T): a plain Linear head a chunk of rows at a time (token_logps; all rows at
    once when not chunked), any other head (an adapter on it, a quantized one) through its own forward."""
    if not linear_ce.fits(head):
        logits = head(hidden).float()
        logits = logits / temperature if temperature != 1.0 else logits
        return torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    bias = head.bias
    if temperature != 1.0:
        hidden, bias = hidden / temperature, bias / temperature if bias is not None else None
    return (token_logps if chunked else plain_token_logps)(hidden, head.weight, bias, targets)


def sequence_sums(values: torch.Tensor, sequence: torch.Tensor, n: int) -> torch.Tensor:
    """Per-sequence sums (n,) of row values, `sequence` giving each row's sequence index."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, sequence, values)
