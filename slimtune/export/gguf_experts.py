"""Mixture-of-experts models in GGUF (export/gguf.py): llama.cpp's expert hyperparameters and its stacked
expert tensors.

A merged folder stores experts as the checkpoint did: one matrix per expert and projection
(`model.layers.N.mlp.experts.E.gate_proj.weight` for Qwen3-MoE, `...block_sparse_moe.experts.E.w1.weight` for
Mixtral). llama.cpp wants them stacked, [experts, out, in], under one name per layer and projection
(`blk.N.ffn_gate_exps.weight`, `ffn_up_exps`, `ffn_down_exps`), as its convert_hf_to_gguf.py writes them; the
router is `blk.N.ffn_gate_inp.weight`. Mixtral is written as llama.cpp's `llama` architecture with experts,
Qwen3-MoE as `qwen3moe`.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from ..methods.experts import per_layer
from . import ExportError

if TYPE_CHECKING:
    from gguf import GGUFWriter
    from transformers import PretrainedConfig

ARCHS = {"qwen3_moe": "qwen3moe", "mixtral": "llama"}
PER_EXPERT = re.compile(r"(?P<layer>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>\w+)\.weight")


def check(cfg: PretrainedConfig, where: str) -> None:
    """Refuse a mixture-of-experts config that llama.cpp's architecture would run differently."""
    if cfg.model_type != "qwen3_moe":
        return
    if not getattr(cfg, "norm_topk_prob", False):
        raise ExportError(f"{where}: norm_topk_prob is false, but llama.cpp's qwen3moe always renormalizes the "
                          "top-k router weights: the GGUF would route differently; convert it with llama.cpp's "
                          "convert_hf_to_gguf.py if its output is what you want")
    if getattr(cfg, "mlp_only_layers", None) or getattr(cfg, "decoder_sparse_step", 1) != 1:
        raise ExportError(f"{where}: dense MLP layers among the expert layers (mlp_only_layers / "
                          "decoder_sparse_step) have no place in llama.cpp's qwen3moe, where every layer has experts")


def hparams(w: GGUFWriter, cfg: PretrainedConfig) -> None:
    """expert_count, expert_used_count and (qwen3moe) each expert's feed-forward width."""
    experts = per_layer(cfg)
    if not experts:
        return
    w.add_expert_count(experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if getattr(cfg, "moe_intermediate_size", None):
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)


def stacked(tensors: Iterator[tuple[str, np.ndarray]], experts: int, where: str) -> Iterator[tuple[str, np.ndarray]]:
    """The tensors with each layer's per-expert matrices replaced by one [experts, out, in] stack per projection,
    named as transformers' merged checkpoints name it (`...experts.gate_proj.weight`), which gguf's
    TensorNameMap maps to llama.cpp's ffn_*_exps. A stack is yielded once all its experts have come by."""
    waiting: dict[tuple[str, str], dict[int, np.ndarray]] = {}
    for name, data in tensors:
        m = PER_EXPERT.fullmatch(name) if experts else None
        if m is None:
            yield name, data
            continue
        key = (m["layer"], m["proj"])
        waiting.setdefault(key, {})[int(m["expert"])] = data
        if len(waiting[key]) == experts:
            parts = waiting.pop(key)
            if sorted(parts) != list(range(experts)):
                raise ExportError(f"{where}: {key[0]}.*.{key[1]}: experts numbered {sorted(parts)}, expected "
                                  f"0 to {experts - 1}")
            yield f"{key[0]}.{key[1]}.weight", np.stack([parts[e] for e in range(experts)])
    for (layer, proj), parts in waiting.items():
        raise ExportError(f"{where}: {layer}.*.{proj} has {len(parts)} of the {experts} experts' weights; the "
                          "folder is incomplete: merge the run again")
