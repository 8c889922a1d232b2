"""full: every weight trains (for small models, or half precision on a GPU with room for AdamW state)."""
from __future__ import annotations


def apply(model, cfg):
    for p in model.parameters():
        p.requires_grad_(True)
    return model
