"""What kind of model a method is applied to: a transformers causal LM, another transformers model (an
encoder such as BERT), or the user's own nn.Module, possibly wrapping a pretrained transformers model.

Methods read the architecture (peft's default targets, IA3's feed-forward modules) through here, so a
model without a transformers config gets a clear "name the modules" instead of an AttributeError.
"""
from __future__ import annotations

import torch


def _pretrained_class():
    from transformers import PreTrainedModel

    return PreTrainedModel


def is_pretrained(module: torch.nn.Module) -> bool:
    """A transformers model (its weights come from a checkpoint's state dict)."""
    return isinstance(module, _pretrained_class())


def pretrained_base(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model itself when it is a transformers model, else the first transformers model inside it
    (the pretrained part of a user's wrapper); None for a model with none."""
    if is_pretrained(model):
        return model
    return next((m for m in model.modules() if is_pretrained(m)), None)


def model_type(model: torch.nn.Module) -> str | None:
    """The architecture name peft's tables are keyed by ("llama", "bert"...), read from the model's
    transformers config or that of the pretrained model it wraps; None without one."""
    base = pretrained_base(model)
    return getattr(getattr(base, "config", None), "model_type", None)


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A transformers causal LM: slimtune's language-model loss, packing and prompt methods apply."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not is_pretrained(model):
        return False
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


def task_type(model: torch.nn.Module):
    """peft's task type: CAUSAL_LM for causal LMs; None (a plain PeftModel, whose forward passes every
    argument through unchanged) for encoders and the user's own modules."""
    from peft import TaskType

    return TaskType.CAUSAL_LM if is_causal_lm(model) else None


def new_modules(model: torch.nn.Module) -> list[str]:
    """Direct submodules of a user's wrapper that hold parameters outside its pretrained base: they
    were not in the checkpoint's state dict (freshly initialised heads). [] for a transformers model
    or a module that wraps none (nothing there tells new from pretrained)."""
    if is_pretrained(model) or pretrained_base(model) is None:
        return []
    return [name for name, child in model.named_children()
            if pretrained_base(child) is None and any(True for _ in child.parameters())]
