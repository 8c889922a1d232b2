"""Fine-tuning methods behind one config key (method.name); each module has apply/trainable/adapter_state."""
from __future__ import annotations

from . import lora

REGISTRY = {"lora": lora}


def apply(model, cfg):
    """Apply the configured method; returns the model to train."""
    return REGISTRY[cfg.name].apply(model, cfg)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counted as peft's print_trainable_parameters does."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if n == 0 and hasattr(p, "ds_numel"):  # pragma: no cover - deepspeed-sharded parameters
            n = p.ds_numel
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
