"""Gemma 3 (text) in GGUF (export/gguf.py): llama.cpp's `gemma3` architecture.

What differs from the Llama-style archs, as llama.cpp's convert_hf_to_gguf.py writes Gemma 3:
- every RMSNorm weight is stored as 1 + w (Gemma scales by 1 + w; llama.cpp's norm multiplies by the stored
  weight), including the four norms of each layer and the per-head q/k norms; transformers' GGUF reader
  subtracts the 1 again;
- the sliding window is written (`gemma3.attention.sliding_window`); llama.cpp then runs every sixth layer with
  full attention and the others in the window, with RoPE base 10,000 in the window and `rope.freq_base` (the
  full-attention layers' base) elsewhere, and scales queries by 1/sqrt(head_dim);
- Q/K rows are not permuted (Gemma's RoPE is the half-split one llama.cpp's gemma3 graph uses).
A config llama.cpp would run differently (another layer pattern, another query scale, logit soft-capping, RoPE
scaling) is refused with the reason: the GGUF would compute something else than the merged model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from . import ExportError

if TYPE_CHECKING:
    from gguf import GGUFWriter
    from transformers import PretrainedConfig

ARCHS = {"gemma3_text": "gemma3"}
LOCAL_BASE = 10000.0  # llama.cpp's RoPE base for the sliding-window layers of gemma3
PATTERN = 6  # llama.cpp's gemma3: layer i is full attention when (i + 1) % 6 == 0


def _rope(cfg: PretrainedConfig, kind: str) -> dict:
    params = getattr(cfg, "rope_parameters", None) or {}
    return params.get(kind, params) if isinstance(params, dict) else {}


def check(cfg: PretrainedConfig, where: str) -> None:
    """Refuse a Gemma 3 config that llama.cpp's gemma3 would run differently."""
    if cfg.model_type not in ARCHS:
        return
    head_dim = cfg.head_dim
    want = ["full_attention" if (i + 1) % PATTERN == 0 else "sliding_attention" for i in range(cfg.num_hidden_layers)]
    local, full = _rope(cfg, "sliding_attention"), _rope(cfg, "full_attention")
    problems = [
        (list(getattr(cfg, "layer_types", None) or want) != want, "layer_types: llama.cpp's gemma3 runs every "
         f"{PATTERN}th layer with full attention and the others in the sliding window"),
        (cfg.query_pre_attn_scalar != head_dim, f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} is not head_dim "
         f"{head_dim}: llama.cpp's gemma3 scales queries by 1/sqrt(head_dim)"),
        (bool(getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "attn_logit_softcapping", None)),
         "logit soft-capping is set: llama.cpp's gemma3 has none"),
        (float(local.get("rope_theta", LOCAL_BASE)) != LOCAL_BASE, f"the sliding-window layers' RoPE base is "
         f"{local.get('rope_theta')}: llama.cpp's gemma3 uses {LOCAL_BASE:g}"),
        (any((p.get("rope_type") or "default") != "default" for p in (local, full)), "RoPE scaling "
         f"({full.get('rope_type')}) is not written for gemma3 by slimtune yet"),
    ]
    for bad, why in problems:
        if bad:
            raise ExportError(f"{where}: {why}; convert this model with llama.cpp's convert_hf_to_gguf.py")


def hparams(w: GGUFWriter, cfg: PretrainedConfig) -> None:
    """gemma3's sliding window."""
    if cfg.model_type in ARCHS:
        w.add_sliding_window(cfg.sliding_window)


def tensor(arch: str, name: str, data: np.ndarray) -> np.ndarray:
    """A weight as llama.cpp's gemma3 reads it: RMSNorm weights as 1 + w."""
    return data + 1.0 if arch == "gemma3" and name.endswith("norm.weight") else data
