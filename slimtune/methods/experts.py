"""The experts and routers of a mixture-of-experts model, found by structure, for LoRA's targets and its report.

transformers 5 stores most experts fused: one 3-D parameter per projection on a `*Experts` module
(Qwen3-MoE and Mixtral `experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]; gpt-oss the
same transposed, [E, H, 2I] and [E, I, H], with biases beside them). peft reaches those through
LoraConfig.target_parameters (lora.ParamWrapper: an A and B per expert, E x r rows), not target_modules.
Older and remote-code MoE models keep one nn.Linear per expert (`experts.0.w1`...): those are ordinary
LoRA targets. The router (`gate` / `router`, a Linear or a `*Router` module beside the experts) stays frozen
unless method.train_router trains it in full (peft's modules_to_save), since LoRA on a few thousand router
weights saves nothing and a drifting router moves every token's choice of experts.
"""
from __future__ import annotations

import re

import torch

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
PER_EXPERT = re.compile(r"(^|.*\.)experts\.\d+\.")  # a module inside one expert of a ModuleList


def _is_experts(name: str, module: torch.nn.Module) -> bool:
    return name.rsplit(".", 1)[-1] == "experts" or type(module).__name__.endswith("Experts")


def is_experts_module(module: torch.nn.Module) -> bool:
    """Whether `module` holds experts by its class (`*Experts`: the owner of fused expert weights)."""
    return type(module).__name__.endswith("Experts")


def fused(model: torch.nn.Module) -> list[str]:
    """Full names of the fused expert weights: the 3-D parameters ([experts, in/out, out/in]) held directly by
    an experts module (their 2-D biases are not LoRA targets)."""
    out = []
    for name, module in model.named_modules():
        if _is_experts(name, module):
            out += [f"{name}.{p}" for p, w in module.named_parameters(recurse=False) if w.ndim == 3]
    return out


def expert_linears(names: list[str]) -> list[str]:
    """Of the Linear module names `names`, those inside one expert of a ModuleList of experts."""
    return [n for n in names if PER_EXPERT.match(n)]


def routers(model: torch.nn.Module) -> list[str]:
    """Full names of the routers: a `gate`/`router` module (or a `*Router` class) beside an experts module."""
    out = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if not any(_is_experts(c, m) for c, m in children.items()):
            continue
        for child, m in children.items():
            if child in ROUTER_NAMES or "Router" in type(m).__name__:
                out.append(f"{name}.{child}" if name else child)
    return out


def per_layer(mcfg: object) -> int:
    """The number of experts per layer a transformers config names (num_experts, Mixtral's num_local_experts; 0 for
    a dense model)."""
    return getattr(mcfg, "num_experts", 0) or getattr(mcfg, "num_local_experts", 0) or 0


def is_moe(model: torch.nn.Module) -> bool:
    return bool(fused(model)) or any(_is_experts(n, m) for n, m in model.named_modules())


def select(model: torch.nn.Module, targets: list[str]) -> list[str]:
    """The fused expert weights method.target_modules reaches (peft's target_parameters): all of them for the
    default ([]) and all-linear; by name ("gate_up_proj", "experts.down_proj") or one "re:" regex over the
    parameters' full names otherwise."""
    names = fused(model)
    if not targets or targets == ["all-linear"]:
        return names
    if len(targets) == 1 and targets[0].startswith("re:"):
        try:
            rx = re.compile(targets[0][3:])
        except re.error:
            return []  # targets.resolve reports the bad regex
        return [n for n in names if rx.fullmatch(n)]
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def report(model: torch.nn.Module, train_router: bool) -> str | None:
    """`experts: 48 of 48 layers' expert weights adapted (gate_up_proj, down_proj; 128 experts each); router
    frozen (...)` for a peft-wrapped MoE model; None for a dense one."""
    from peft.tuners.lora import LoraLayer

    layers: dict[str, set[str]] = {}  # each experts module (name without peft's base_layer) -> its adapted weights
    count = 0
    for name, module in model.named_modules():
        plain = re.sub(r"(\.base_layer)+", "", name)
        if getattr(module, "parameter_name", None) and isinstance(module, LoraLayer):  # peft's ParamWrapper
            layers.setdefault(plain, set()).add(module.parameter_name)
            count = module.num_experts
        elif isinstance(module, LoraLayer) and PER_EXPERT.match(plain):
            owner, _, rest = plain.rpartition(".experts.")
            layers.setdefault(f"{owner}.experts", set()).add(rest.split(".", 1)[-1])
        elif _is_experts(plain, module) and not isinstance(module, LoraLayer):
            layers.setdefault(plain, set())
            if isinstance(module, torch.nn.ModuleList):
                count = len(module)
    if not layers:
        return None
    adapted = sum(1 for v in layers.values() if v)
    weights = ", ".join(sorted(set().union(*layers.values()))) or "none"
    each = f"; {count} experts each" if count else ""
    router = ("router trained in full (method.train_router)" if train_router
              else "router frozen (method.train_router=true trains it)")
    return f"experts: {adapted} of {len(layers)} layers' expert weights adapted ({weights}{each}); {router}"
