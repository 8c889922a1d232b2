"""Gradient (activation) checkpointing: transformers' switch, turned on as the run plan says."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import ConfigError, MethodConfig
from ..methods import kinds


# determinism_check "none": torch still checks that the recompute saved as many tensors as the forward, but no
# longer builds a {shape, dtype, device} dict for each saved tensor, in the forward and the recompute, and compares
# them: host time a CPU-paced GPU step waits for
KWARGS = {"use_reentrant": False, "determinism_check": "none"}
HOOK = "enable_input_require_grads.<locals>.make_inputs_require_grads"  # transformers' hook, which peft calls too


def enable_checkpointing(model: torch.nn.Module, cfg_method: MethodConfig,
                         log: Callable[[str], None] = print) -> bool:
    """Recompute activations in backward; returns whether it is on. Non-reentrant checkpointing needs no
    input that requires grad, so with a frozen embedding (every method but full) gradients still reach the
    adapters, and the hook of `enable_input_require_grads`, which transformers adds here, is taken off again
    (drop_input_grads). Prefix tuning passes its prefix as a KV cache, which checkpointed layers drop (peft
    refuses the pair): it trains without checkpointing."""
    if cfg_method.name == "prefix_tuning":
        log("train.gradient_checkpointing is off for prefix_tuning: checkpointed layers would drop the learned "
            "prefix (its keys/values travel as a KV cache); activations take the memory they need")
        return False
    owner = model if hasattr(model, "gradient_checkpointing_enable") else kinds.pretrained_base(model)
    if owner is None:  # the user's own module: transformers' switch is not there to turn on
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} holds no transformers model, whose "
                          "gradient_checkpointing_enable this turns on; set it to false (or checkpoint in the "
                          "module's forward with torch.utils.checkpoint)")
    if hasattr(owner, "activation_checkpointing_enable"):  # transformers >= 5.25 (the old name warns there)
        owner.activation_checkpointing_enable(activation_checkpointing_kwargs=KWARGS)
    else:
        owner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=KWARGS)
    drop_input_grads(owner)
    owner.config.use_cache = False
    return True


def drop_input_grads(model: torch.nn.Module) -> None:
    """Take off the hook `enable_input_require_grads` puts on the input embeddings, which transformers adds with
    checkpointing (whatever use_reentrant says) and peft when it wraps a checkpointed model. It makes the frozen
    embedding output a leaf that requires grad: held on the GPU all step by its gradient's accumulator (the offload
    of layer inputs moves only the copy the checkpoint saves), given a gradient nothing reads (tokens x hidden
    again) and the first layer's input-gradient matmuls; frozen layers below a `freeze` run's trainable ones would
    keep activations for a backward they never need. Kept where checkpointing may be reentrant (a layer whose
    input needs no gradient then gives its adapters none): a model's own code (trust_remote_code), which may call
    torch.utils.checkpoint itself, and layers checkpointed without use_reentrant=False (the user's own switch)."""
    base = kinds.pretrained_base(model)
    if base is None or not type(base).__module__.startswith("transformers."):
        return
    funcs = [getattr(m, "_gradient_checkpointing_func", None) for m in base.modules()
             if getattr(m, "gradient_checkpointing", False) is True]
    if any(getattr(f, "keywords", {}).get("use_reentrant", True) is not False for f in funcs):
        return
    if getattr(base, "_require_grads_hooks", None) or getattr(base, "_require_grads_hook", None):
        base.disable_input_require_grads()  # where the handles are (a peft wrapper forwards to its base)
    try:
        emb = base.get_input_embeddings()
    except (NotImplementedError, AttributeError):  # a model without one: no hook there either
        return
    # and by the function: each enable_input_require_grads call forgets the handle of the one before
    hooks = getattr(emb, "_forward_hooks", {})
    for key, fn in list(hooks.items()):
        if getattr(fn, "__qualname__", "").endswith(HOOK):
            del hooks[key]


def checkpointing_on(model: torch.nn.Module) -> bool:
    """Whether transformers' activation checkpointing is on in any layer of `model` (wrapped or not)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def match_checkpointing(model: torch.nn.Module, wanted: bool, cfg_method: MethodConfig,
                        log: Callable[[str], None] = print) -> None:
    """Checkpointing on where the run plan wants it and it is off: `prepare` then `fit` (the Python API)
    resolves an auto split only in fit, after prepare has run, so a split that chose checkpointing, with the
    layer inputs offloaded, must find it on in the model. Without it the offload hooks move every activation
    autograd saves to CPU memory: measured on an H100 at 8B, 1.26 s a step instead of 0.54, and a 7-15 s
    stall while pinned host memory grew."""
    if wanted and not checkpointing_on(model) and enable_checkpointing(model, cfg_method, log):
        log("gradient checkpointing on: the batch split chose it (prepare ran before the split was known)")
