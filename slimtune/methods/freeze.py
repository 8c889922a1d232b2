"""freeze: train only the last N decoder layers (or the parameters matching a regex); the rest is frozen."""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

import torch

from .base import MethodError, freeze_all

if TYPE_CHECKING:
    from ..config import MethodConfig


def decoder_layers(model: torch.nn.Module) -> tuple[str, int]:
    """(name, length) of the model's stack of decoder blocks: the ModuleList holding the most parameters."""
    best, size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = (name, len(module)), n
    if best is None:
        raise MethodError("method freeze: found no list of decoder layers in this model; "
                          "set method.trainable_pattern to a regex of parameter names to train")
    return best


def selected(model: torch.nn.Module, cfg: MethodConfig) -> list[str]:
    names = [n for n, _ in model.named_parameters()]
    if cfg.trainable_pattern:
        try:
            rx = re.compile(cfg.trainable_pattern)
        except re.error as err:
            raise MethodError(f"method.trainable_pattern: invalid regex: {err}") from None
        chosen = [n for n in names if rx.search(n)]
        if not chosen:
            raise MethodError(f"method.trainable_pattern {cfg.trainable_pattern!r} matches no parameter; "
                              f"names look like: {', '.join(names[:6])}, ...")
        return chosen
    stack, depth = decoder_layers(model)
    if not 1 <= cfg.trainable_layers <= depth:
        raise MethodError(f"method.trainable_layers: {cfg.trainable_layers} is not between 1 and the model's "
                          f"{depth} layers")
    prefixes = tuple(f"{stack}.{i}." for i in range(depth - cfg.trainable_layers, depth))
    return [n for n in names if n.startswith(prefixes)]


def apply(model: torch.nn.Module, cfg: MethodConfig) -> torch.nn.Module:
    freeze_all(model)
    params = dict(model.named_parameters())
    for name in selected(model, cfg):
        params[name].requires_grad_(True)
    return model
