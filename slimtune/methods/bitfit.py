"""bitfit: train only the bias terms (every Linear and norm bias); everything else stays frozen."""
from __future__ import annotations

from typing import TYPE_CHECKING

from .base import MethodError, freeze_all

if TYPE_CHECKING:
    from torch import nn

    from ..config import MethodConfig


def apply(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    freeze_all(model)
    biases = [p for n, p in model.named_parameters() if n.endswith(".bias") or n == "bias"]
    if not biases:
        arch = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise MethodError(f"method bitfit trains bias terms, and this {arch} model has none; choose lora, ia3 "
                          "or freeze instead")
    for p in biases:
        p.requires_grad_(True)
    return model
