"""Modules that are not in the pretrained checkpoint (a wrapper's freshly initialised heads, or the ones
the caller names) and must therefore train, and the parameter counts that show whether they do.

The tutorial slimtune grew from applied LoRA on a BERT wrapped with two span heads and printed
`trainable params: 589,824 || all params: 110,073,602`: LoRA's count alone, so its random heads were
frozen and never trained. peft says nothing about that; slimtune warns, naming modules_to_save.
"""
from __future__ import annotations

import warnings

from torch import nn

from . import kinds
from .base import MethodError, count_parameters, is_peft


class FrozenModuleWarning(UserWarning):
    """A module outside the pretrained checkpoint stays frozen: it keeps its random initialisation."""


def describe_parameters(model: nn.Module) -> str:
    """The line peft's print_trainable_parameters prints, counted the same way."""
    trainable, total = count_parameters(model)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}"


def unwrapped(model: nn.Module) -> tuple[nn.Module, str]:
    """(the module inside nn.DataParallel / DistributedDataParallel / torch.compile's wrapper, the prefix of
    its names in the wrapper): the wrapper's one child holds the pretrained base, so without this every head
    of the user's model would pass for pretrained and no FrozenModuleWarning would say they stay frozen."""
    prefix = ""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model, prefix = model.module, prefix + "module."
        elif type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model, prefix = model._orig_mod, prefix + "_orig_mod."
        else:
            return model, prefix


def frozen(model: nn.Module, heads: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The new modules (kinds.new_modules, plus `heads`, names relative to the model as the caller built
    it) of which no parameter trains."""
    root = model.get_base_model() if is_peft(model) else model  # peft wraps the caller's model unchanged
    inner, prefix = unwrapped(root)
    names = list(dict.fromkeys([*(prefix + n for n in kinds.new_modules(inner)), *heads]))
    out = []
    for name in names:
        try:
            module = root.get_submodule(name)
        except AttributeError:
            children = ", ".join(n for n, _ in root.named_children())
            raise MethodError(f"heads: {name!r} is not a module of {type(root).__name__}; its direct submodules: "
                              f"{children}") from None
        if not any(p.requires_grad for p in module.parameters()):
            out.append(name)
    return out


def warn_frozen(model: nn.Module, method: str, heads: tuple[str, ...] | list[str] = ()) -> list[str]:
    """Warn (FrozenModuleWarning) about each new module left frozen by `method`; returns their names."""
    names = frozen(model, heads)
    if names:
        one = len(names) == 1
        fix = (f"train them with method.trainable_pattern (e.g. '^({'|'.join(names)})\\.')" if method == "freeze"
               else f"train them with modules_to_save={names!r} (method.modules_to_save)")
        warnings.warn(f"{', '.join(names)}: not part of the pretrained model, yet method {method} leaves "
                      f"{'it' if one else 'them'} frozen, so {'it keeps its' if one else 'they keep their'} random "
                      f"initial weights and never train{'s' if one else ''}; {fix}", FrozenModuleWarning,
                      stacklevel=3)
    return names
