"""Forwards bound to single module instances and taken back: how kernels/lora.py, norm_mlp.py and rope.py
put a fast path into one model without patching a class, so other models in the process keep their own."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def bind(module: torch.nn.Module, forward: Callable[..., Any], attr: str, mark: object = True) -> None:
    """module.forward becomes `forward` (a callable, already bound); `attr` marks it (and can hold `mark`)."""
    module.forward = forward
    setattr(module, attr, mark)


def unbind(model: torch.nn.Module, attr: str) -> None:
    """Every module marked with `attr` gets its class's forward back."""
    for module in model.modules():
        if hasattr(module, attr):
            del module.forward  # the instance attribute: the class's forward shows through again
            delattr(module, attr)


def count(model: torch.nn.Module, attr: str) -> int:
    return sum(hasattr(m, attr) for m in model.modules())
