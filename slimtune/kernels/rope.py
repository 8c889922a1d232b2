"""Liger-Kernel's fused rotary embedding for one model's attention layers (train.fused_rope).

transformers applies RoPE through a module-level function (`apply_rotary_pos_emb` in modeling_llama and
its kin) that the attention forward looks up when it runs: four multiplies, two rotate-halves (slice, neg,
cat) and two adds per layer, forward, recompute and backward. Liger patches that function for the whole
process. Here enable(model) wraps the forward of this model's attention modules only: while one of them
runs (its checkpointed recompute included), the module-level name points at Liger's Triton kernel, and it
is put back as the forward returns. Other models in the process keep transformers' own RoPE.

Reference: transformers' apply_rotary_pos_emb (tests/kernels/test_rope_gpu.py compares q, k and their
gradients on a GPU; tests/kernels/test_rope.py checks the binding on the CPU). CUDA and liger-kernel only.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from ..errors import MissingPackageError
from . import bind
from .norm_mlp import available

ATTR = "_slimtune_rope"
ATTN_TYPES = ("LlamaAttention", "MistralAttention", "Qwen2Attention", "Qwen3Attention")


def _fused(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           unsqueeze_dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb signature, Liger's kernel."""
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    return liger_rotary_pos_emb(q, k, cos, sin, None, unsqueeze_dim)


def _forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    module = sys.modules[type(self).__module__]
    own = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = _fused
    try:
        return type(self).forward(self, *args, **kwargs)
    finally:
        module.apply_rotary_pos_emb = own


def _eligible(m: torch.nn.Module) -> bool:
    return type(m).__name__ in ATTN_TYPES and hasattr(sys.modules[type(m).__module__], "apply_rotary_pos_emb")


def enable(model: torch.nn.Module) -> int:
    """Wrap every eligible attention module's forward; returns how many."""
    if not available():
        raise MissingPackageError("train.fused_rope=on needs Liger-Kernel (pip install liger-kernel)")
    n = 0
    for m in model.modules():
        if not hasattr(m, ATTR):
            if not _eligible(m):
                continue
            bind.bind(m, _forward.__get__(m, type(m)), ATTR)
        n += 1
    return n


def disable(model: torch.nn.Module) -> None:
    bind.unbind(model, ATTR)
