"""IA3 through peft: learned scaling vectors on attention and feed-forward activations."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import kinds, targets
from .base import MethodError

if TYPE_CHECKING:
    from torch import nn

    from ..config import MethodConfig


def apply(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from peft import IA3Config, get_peft_model
    from peft.utils import constants

    # feed-forward modules scale their input, the others their output; peft's table knows which are which
    # per architecture, so a model without one (the user's own) names them in method.feedforward_modules
    default_ff = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(kinds.model_type(model), [])
    if cfg.target_modules:
        target = targets.resolve(model, cfg.target_modules)
        feedforward = [t for t in target if any(t.endswith(f.split(".")[-1]) for f in default_ff)] \
            if isinstance(target, list) else []
    else:
        target = targets.default_targets(model, "IA3")
        feedforward = list(default_ff)
    if cfg.feedforward_modules:
        feedforward = _feedforward(cfg.feedforward_modules, target)
    if cfg.layers_to_transform:
        raise MethodError("method.layers_to_transform applies to the LoRA methods; for ia3 restrict layers with a "
                          "regex in method.target_modules, e.g. 're:.*layers\\.(0|1)\\..*(k_proj|v_proj)'")
    targets.check_modules_to_save(model, cfg.modules_to_save)
    icfg = IA3Config(task_type=kinds.task_type(model), target_modules=target, feedforward_modules=feedforward,
                     modules_to_save=cfg.modules_to_save or None)
    return get_peft_model(model, icfg)


def _feedforward(names: list[str], target: list[str] | str) -> list[str]:
    """peft needs the feed-forward modules among the targets (it scales their input instead)."""
    if not isinstance(target, list):
        raise MethodError("method.feedforward_modules needs method.target_modules as names, not a regex: peft "
                          "checks the feed-forward modules are among the targets")
    outside = [n for n in names if n not in target]
    if outside:
        raise MethodError(f"method.feedforward_modules: {', '.join(outside)} not among method.target_modules "
                          f"({', '.join(target)}); add them there too")
    return list(names)
