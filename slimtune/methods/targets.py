"""Find the modules a method targets, by names, a regex ("re:<regex>") or "all-linear", for any architecture."""
from __future__ import annotations

import re
from collections import Counter

import torch

from . import kinds
from .base import MethodError


class TargetError(MethodError):
    """No module matches method.target_modules (a MethodError, so callers of apply catch both)."""


def _is_linear(module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D"  # GPT-2 style transformers.pytorch_utils.Conv1D


def linear_names(model) -> list[str]:
    """Full names of the Linear / Conv1D modules, without the output head (never a LoRA target)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if _is_linear(m) and m is not head]


def default_targets(model, table: str = "LORA") -> list[str]:
    """peft's per-architecture default targets (LORA or IA3 table); an error lists what exists."""
    from peft.utils import constants

    mapping = getattr(constants, f"TRANSFORMERS_MODELS_TO_{table}_TARGET_MODULES_MAPPING")
    model_type = kinds.model_type(model)  # a user's wrapper takes that of the transformers model inside it
    if model_type not in mapping:
        short = Counter(n.rsplit(".", 1)[-1] for n in linear_names(model))
        what = f"model type {model_type!r}" if model_type else \
            f"{type(model).__name__} (it has no transformers config to read the architecture from)"
        raise TargetError(f"method.target_modules: no default for {what}; name the modules, e.g. "
                          f"target_modules=[{', '.join(repr(k) for k in sorted(short)[:2])}] (or all-linear); "
                          f"{_available(short)}")
    return list(mapping[model_type])


def resolve(model, targets: list[str]) -> list[str] | str:
    """Targets in the form peft's configs take: a list of suffixes or one regex string."""
    names = linear_names(model)
    short = Counter(n.rsplit(".", 1)[-1] for n in names)
    if not targets:
        targets = default_targets(model)
    if targets == ["all-linear"]:
        return sorted(short)
    if len(targets) == 1 and targets[0].startswith("re:"):
        pattern = targets[0][3:]
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise TargetError(f"method.target_modules: invalid regex {pattern!r}: {err}") from None
        if not any(rx.fullmatch(n) for n in names):
            raise TargetError(f"method.target_modules: regex {pattern!r} matches no Linear module (it must "
                              f"match the full name, e.g. {names[0] if names else '-'}); {_available(short)}")
        return pattern
    missing = [t for t in targets if t not in short and not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise TargetError(f"method.target_modules: {', '.join(missing)} match no Linear module; "
                          f"{_available(short)}")
    return list(targets)


def _available(short: Counter) -> str:
    return "available: " + ", ".join(f"{k} (x{v})" for k, v in sorted(short.items()))


def describe(model) -> str:
    """A table of the Linear/Conv1D modules by short name, with shapes and counts, and all-linear."""
    modules = dict(model.named_modules())
    rows: dict[str, tuple[set, int]] = {}
    for name in linear_names(model):
        module = modules[name]
        out_f, in_f = module.weight.shape
        if type(module).__name__ == "Conv1D":  # GPT-2's Conv1D stores the weight as (in, out)
            out_f, in_f = in_f, out_f
        key = name.rsplit(".", 1)[-1]
        shapes, count = rows.get(key, (set(), 0))
        rows[key] = (shapes | {f"{in_f}->{out_f}"}, count + 1)
    width = max([len(k) for k in rows] + [6])
    lines = [f"{'module':<{width}}  count  in->out features"]
    lines += [f"{k:<{width}}  {c:>5}  {', '.join(sorted(s))}" for k, (s, c) in sorted(rows.items())]
    lines.append(f"all-linear = {', '.join(sorted(rows))}")
    try:
        lines.append(f"default (method.target_modules: []) = {', '.join(default_targets(model))}")
    except TargetError:
        lines.append("default: none for this architecture; name the modules")
    return "\n".join(lines)
