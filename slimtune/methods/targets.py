"""Find the modules a method targets, by names, a regex ("re:<regex>") or "all-linear", for any architecture."""
from __future__ import annotations

import re
from collections import Counter

import torch


class TargetError(ValueError):
    pass


def _is_linear(module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D"  # GPT-2 style transformers.pytorch_utils.Conv1D


def linear_names(model) -> list[str]:
    """Full names of the Linear / Conv1D modules, without the output head (never a LoRA target)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if _is_linear(m) and m is not head]


def resolve(model, targets: list[str]) -> list[str] | str:
    """Targets in the form peft's LoraConfig takes: a list of suffixes or one regex string."""
    names = linear_names(model)
    short = Counter(n.rsplit(".", 1)[-1] for n in names)
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
    missing = [t for t in targets if t not in short]
    if missing:
        raise TargetError(f"method.target_modules: {', '.join(missing)} match no Linear module; "
                          f"{_available(short)}")
    return list(targets)


def _available(short: Counter) -> str:
    return "available: " + ", ".join(f"{k} (x{v})" for k, v in sorted(short.items()))
