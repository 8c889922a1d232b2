"""What a mixture-of-experts model adds to the memory estimate (engine/memory.py).

Weights: every expert is resident, and the meta model's parameters already hold them all (fused 3-D expert
weights included), as do their LoRA parameters and AdamW state; qlora holds fused expert weights in NF4 as it
holds Linear layers (methods/quant_experts.py), NF4_BYTES a weight (packed_stack tells them). Activations: a
token runs through its top-k experts only, so the feed-forward width its saved activations scale with is top-k
x one expert's (ffn_width). LoRA on fused expert weights adds a term of its own (expert_copies).
The load is no larger moment: qlora loads such a model onto the CPU and brings one 16-bit stack at a time to the
GPU to pack it (methods/quant.load_base), so its peak is the 4-bit weights plus one stack, under a step that
dequantizes a whole stack (LoRA on the experts, the default).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..methods import experts

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from ..config import Config
    from .memory import Estimate
    from .precision import Dtypes

GIB = 2 ** 30
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + an 8-bit absmax per 64 + an fp32 scale per 256 absmax


def packed_stack(owner: torch.nn.Module | None, p: torch.Tensor) -> bool:
    """Whether qlora packs parameter `p` of module `owner` in NF4 beside the Linear layers: a fused 3-D expert
    weight (methods/experts.fused)."""
    return owner is not None and p.ndim == 3 and experts.is_experts_module(owner)


def ffn_width(mcfg: PretrainedConfig) -> int:
    """The feed-forward width a token's saved activations scale with: the MLP's intermediate size, or in a
    mixture of experts the top-k experts' it runs through (each moe_intermediate_size, else intermediate_size)
    plus a shared expert's."""
    dense = getattr(mcfg, "intermediate_size", None) or 4 * mcfg.hidden_size
    top_k = getattr(mcfg, "num_experts_per_tok", 0) or 0
    if not top_k or not experts.per_layer(mcfg):
        return dense
    each = getattr(mcfg, "moe_intermediate_size", None) or dense
    return top_k * each + (getattr(mcfg, "shared_expert_intermediate_size", 0) or 0)


def stacks(model: torch.nn.Module) -> dict[str, list[int]]:
    """Elements of each LoRA-adapted fused expert weight, by experts module (one per MoE layer)."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and getattr(module, "parameter_name", None):  # peft's ParamWrapper
            out.setdefault(name.split(".base_layer")[0], []).append(module.get_param().numel())
    return out


def expert_copies(est: Estimate, model: torch.nn.Module, cfg: Config, plan: Dtypes, fused: bool = False) -> Estimate:
    """LoRA on fused expert weights. fused (train.fused_lora: kernels/expert_lora.py): each expert's rows through
    x W^T + s (x A^T) B^T, so no [experts, out, in] copy exists beyond qlora's dequantized stack, one projection
    at a time (in forward, and again in backward). Otherwise peft's ParamWrapper forms W + BA for a layer's whole
    expert stack at each forward (in the weights' dtype) and the expert matmuls keep it for backward, whose
    gradient of it is as large again: every adapted layer's copy without checkpointing, one layer's with it, plus
    that gradient; qlora first dequantizes the stack W + BA is formed from: one more copy of the largest stack
    while it is formed. Read from the code (peft's lora.ParamWrapper, _LoraFactorsProxy), not yet measured on a
    GPU."""
    sizes = stacks(model)
    if not sizes:
        return est
    width = torch.finfo(plan.weights).bits // 8
    one, every = max(map(sum, sizes.values())) * width, sum(map(sum, sizes.values())) * width
    dense = max(map(max, sizes.values())) * width if cfg.method.name == "qlora" else 0
    if fused:
        est.activations += dense
        est.activations_other += dense
        est.notes.append("LoRA on fused experts: per expert from the low-rank factors (no W + BA)" + (
            f", over one dequantized stack at a time ({dense / GIB:.2f} GiB)" if dense else ""))
        return est
    with_ckpt, without = 2 * one + dense, every + one + dense
    ckpt = cfg.train.gradient_checkpointing
    est.activations += with_ckpt if ckpt else without
    est.activations_other += without if ckpt else with_ckpt
    est.notes.append(f"LoRA on fused experts: W + BA of a layer's expert stack ({one / GIB:.2f} GiB) is formed each "
                     f"forward and kept for backward ({'one layer at a time with' if ckpt else 'every layer without'} "
                     "checkpointing)" + (f", from a dequantized stack ({dense / GIB:.2f} GiB)" if dense else ""))
    return est
