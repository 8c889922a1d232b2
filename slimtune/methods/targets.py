"""Find the modules a method targets, by names, a regex ("re:<regex>") or "all-linear", for any architecture."""
from __future__ import annotations

import re
from collections import Counter

import torch

from . import experts, kinds
from .base import MethodError
from .freeze import decoder_layers


# Phi-3 and Phi-4 (model_type phi3) compute q, k and v in one qkv_proj and the MLP's gate and up in one
# gate_up_proj; peft's tables have no default for them. Its default is the fused attention input, as q_proj,v_proj
# is for Llama (peft cannot adapt part of a fused Linear).
FUSED_DEFAULTS = {"phi3": ["qkv_proj"]}
FUSED_NAMES = {"phi3": {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
                        "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}}


class TargetError(MethodError):
    """No module matches method.target_modules (a MethodError, so callers of apply catch both)."""


def _is_linear(module: torch.nn.Module) -> bool:
    if isinstance(module, torch.nn.Linear):
        return True
    return type(module).__name__ == "Conv1D"  # GPT-2 style transformers.pytorch_utils.Conv1D


def linear_names(model: torch.nn.Module) -> list[str]:
    """Full names of the Linear / Conv1D modules, without the output head (never a LoRA target)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [n for n, m in model.named_modules() if _is_linear(m) and m is not head]


def default_targets(model: torch.nn.Module, table: str = "LORA") -> list[str]:
    """peft's per-architecture default targets (LORA or IA3 table); an error lists what exists."""
    from peft.utils import constants

    mapping = getattr(constants, f"TRANSFORMERS_MODELS_TO_{table}_TARGET_MODULES_MAPPING")
    model_type = kinds.model_type(model)  # a user's wrapper takes that of the transformers model inside it
    if table == "LORA" and model_type in FUSED_DEFAULTS:
        return list(FUSED_DEFAULTS[model_type])
    if table == "LORA" and experts.is_moe(model):
        return moe_defaults(model, mapping.get(model_type))
    if model_type not in mapping:
        short = Counter(n.rsplit(".", 1)[-1] for n in linear_names(model))
        what = f"model type {model_type!r}" if model_type else \
            f"{type(model).__name__} (it has no transformers config to read the architecture from)"
        raise TargetError(f"method.target_modules: no default for {what}; name the modules, e.g. "
                          f"target_modules=[{', '.join(repr(k) for k in sorted(short)[:2])}] (or all-linear); "
                          f"{_available(short)}")
    return list(mapping[model_type])


def moe_defaults(model: torch.nn.Module, attention: list[str] | None) -> list[str]:
    """A mixture-of-experts model's default: peft's attention targets (q_proj and v_proj where peft has none for
    the architecture) plus every per-expert Linear; fused expert weights come through experts.select."""
    names = linear_names(model)
    short = {n.rsplit(".", 1)[-1] for n in names}
    # peft's entry: a list of names, or for a few architectures one regex (not a list to extend)
    base = list(attention) if isinstance(attention, list) else [t for t in ("q_proj", "v_proj") if t in short]
    per_expert = sorted({n.rsplit(".", 1)[-1] for n in experts.expert_linears(names)})
    return base + [t for t in per_expert if t not in base]


def resolve(model: torch.nn.Module, targets: list[str]) -> list[str] | str:
    """Targets in the form peft's configs take: a list of suffixes or one regex string. all-linear leaves out
    a mixture-of-experts model's routers (method.train_router trains them in full instead)."""
    names = linear_names(model)
    short = Counter(n.rsplit(".", 1)[-1] for n in names)
    fused = experts.fused(model)
    if not targets:
        targets = default_targets(model)
    if targets == ["all-linear"]:
        routers = set(experts.routers(model))
        return sorted({n.rsplit(".", 1)[-1] for n in names if n not in routers})
    if len(targets) == 1 and targets[0].startswith("re:"):
        pattern = targets[0][3:]
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise TargetError(f"method.target_modules: invalid regex {pattern!r}: {err}") from None
        if not any(rx.fullmatch(n) for n in names + fused):
            raise TargetError(f"method.target_modules: regex {pattern!r} matches no Linear module (it must "
                              f"match the full name, e.g. {names[0] if names else '-'}); {_available(short)}")
        return pattern
    missing = [t for t in targets if t not in short and not any(n == t or n.endswith("." + t) for n in names + fused)]
    if missing:
        parts = FUSED_NAMES.get(kinds.model_type(model), {})
        hint = "".join(f" ({t} is part of {parts[t]} in this architecture)" for t in missing if t in parts)
        raise TargetError(f"method.target_modules: {', '.join(missing)} match no Linear module{hint}; "
                          f"{_available(short)}" + (f"; fused expert weights: {_fused_names(fused)}" if fused else ""))
    # a name that only a fused expert weight carries goes to peft's target_parameters, not its target_modules
    return [t for t in targets if t in short or any(n == t or n.endswith("." + t) for n in names)]


def _fused_names(fused: list[str]) -> str:
    return ", ".join(sorted({n.rsplit(".", 1)[-1] for n in fused}))


def matched(model: torch.nn.Module, target: list[str] | str) -> list[str]:
    """Full names of the Linear modules a resolved target (resolve's result) selects, as peft matches them."""
    names = linear_names(model)
    if isinstance(target, str):
        return [n for n in names if re.fullmatch(target, n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in target)]


def features(module: torch.nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear (4-bit ones too: their weight is packed) or a GPT-2 Conv1D."""
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    rows, cols = module.weight.shape  # Conv1D stores (in, out)
    return rows, cols


def check_rank(model: torch.nn.Module, target: list[str] | str, r: int, params: list[str] = ()) -> None:
    """A LoRA rank above a layer's width adds parameters but no capacity (the update's rank is at most the
    smaller side): refuse it, naming the narrowest targeted layer (or fused expert weight, `params`)."""
    modules = dict(model.named_modules())
    widths = [(min(features(modules[n])), n) for n in matched(model, target)]
    widths += [(min(model.get_parameter(n).shape[-2:]), n) for n in params]
    width, name = min(widths) if widths else (r, "")
    if r > width:
        raise MethodError(f"method.r={r} is larger than the width of {name} ({width} = the smaller of its in and out "
                          f"features); set method.r <= {width}, or leave that layer out of method.target_modules")


def check_layers(model: torch.nn.Module, layers: list[int]) -> None:
    """layers_to_transform indices must exist; peft's own error only said the target modules were not found."""
    if not layers:
        return
    try:
        stack, depth = decoder_layers(model)
    except MethodError:  # no stack of layers found: peft's own check is all there is
        return
    bad = [i for i in layers if not 0 <= i < depth]
    if bad:
        raise MethodError(f"method.layers_to_transform: {', '.join(map(str, bad))} out of range: this model has "
                          f"{depth} decoder layers in {stack}, numbered 0 to {depth - 1}")


def check_modules_to_save(model: torch.nn.Module, names: list[str]) -> None:
    """Every modules_to_save entry must name a module (peft matches by name suffix and skips the rest silently)."""
    modules = [n for n, _ in model.named_modules() if n]
    missing = [t for t in names if not any(n == t or n.endswith("." + t) for n in modules)]
    if missing:
        short = sorted({n.rsplit(".", 1)[-1] for n in modules if not n.rsplit(".", 1)[-1].isdigit()})
        verb = "matches" if len(missing) == 1 else "match"
        raise MethodError(f"method.modules_to_save: {', '.join(missing)} {verb} no module of this model; module names "
                          f"end in: {', '.join(short)}")


def _available(short: Counter) -> str:
    return "available: " + ", ".join(f"{k} (x{v})" for k, v in sorted(short.items()))


def describe(model: torch.nn.Module) -> str:
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
    routers = {n.rsplit(".", 1)[-1] for n in experts.routers(model)} & set(rows)
    lines.append(f"all-linear = {', '.join(k for k in sorted(rows) if k not in routers)}")
    fused = experts.fused(model)
    if fused:
        lines.append(f"fused expert weights (in the default and all-linear): {_fused_names(fused)} "
                     f"(x{len(fused)}); routers frozen unless method.train_router")
    try:
        lines.append(f"default (method.target_modules: []) = {', '.join(default_targets(model))}")
    except TargetError:
        lines.append("default: none for this architecture; name the modules")
    return "\n".join(lines)
