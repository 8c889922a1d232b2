"""IA3 through peft: learned scaling vectors on attention and feed-forward activations."""
from __future__ import annotations

from . import targets
from .base import MethodError


def apply(model, cfg):
    from peft import IA3Config, TaskType, get_peft_model
    from peft.utils import constants

    model_type = getattr(model.config, "model_type", None)
    if cfg.target_modules:
        target = targets.resolve(model, cfg.target_modules)
        default_ff = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type, [])
        # feed-forward modules scale their input, the others their output; peft needs them a subset of target
        feedforward = [t for t in target if any(t.endswith(f.split(".")[-1]) for f in default_ff)] \
            if isinstance(target, list) else []
    else:
        target = targets.default_targets(model, "IA3")
        feedforward = list(constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type])
    if cfg.layers_to_transform:
        raise MethodError("method.layers_to_transform applies to the LoRA methods; for ia3 restrict layers with a "
                          "regex in method.target_modules, e.g. 're:.*layers\\.(0|1)\\..*(k_proj|v_proj)'")
    targets.check_modules_to_save(model, cfg.modules_to_save)
    icfg = IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=target, feedforward_modules=feedforward,
                     modules_to_save=cfg.modules_to_save or None)
    return get_peft_model(model, icfg)

