"""full: every weight trains (for small models, or half precision on a GPU with room for AdamW state)."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from ..config import MethodConfig


def apply(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model
