"""Fine-tuning methods behind one config key (method.name).

peft methods (lora, dora, rslora, pissa, qlora, ia3, prompt_tuning, p_tuning, prefix_tuning) save in
peft's format; ours (full, freeze, bitfit) save only the parameters they train, as safetensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..models import load_config
from . import bitfit, freeze, full, ia3, lora, parts, prompt
from .base import MethodError, count_parameters, is_peft, trainable

if TYPE_CHECKING:
    from torch import nn

    from ..config import MethodConfig

REGISTRY = {
    "lora": lora, "dora": lora, "rslora": lora, "pissa": lora, "qlora": lora,
    "ia3": ia3, "prompt_tuning": prompt, "p_tuning": prompt, "prefix_tuning": prompt,
    "full": full, "freeze": freeze, "bitfit": bitfit,
}


def apply(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Apply the configured method; returns the model to train (a PeftModel for peft methods)."""
    return REGISTRY[cfg.name].apply(model, cfg)


def save(model: nn.Module, out_dir: Path, weights: dict | None = None) -> None:
    """peft methods: adapter_config.json + adapter_model.safetensors; ours: the trained parameters.
    weights: the trainable parameters whole (by name), when the model's own are sharded."""
    if is_peft(model):
        lora.save(model, out_dir, weights)  # also handles PiSSA's conversion; a plain save_pretrained otherwise
    else:
        parts.save(model, out_dir, weights)


def count_on_meta(model_path: str, cfg: MethodConfig, trust_remote_code: bool = False) -> tuple[int, int]:
    """(trainable, total) for a method from the model's config.json alone: built on the meta device,
    no weights read. QLoRA has LoRA's shapes and PiSSA its own, without quantization or SVD (methods/lora.py)."""
    import torch
    from transformers import AutoModelForCausalLM  # transformers loads when a count asks for it

    mcfg = load_config(model_path, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=trust_remote_code)
    return count_parameters(apply(model, cfg))


__all__ = ["MethodError", "REGISTRY", "apply", "count_on_meta", "count_parameters", "save", "trainable"]
