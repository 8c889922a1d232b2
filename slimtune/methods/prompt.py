"""Prompt methods through peft: prompt_tuning (learned input embeddings), p_tuning (the same from an MLP
encoder), prefix_tuning (P-tuning v2: learned keys and values in every layer). The base stays frozen."""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import kinds
from .base import MethodError

if TYPE_CHECKING:
    from torch import nn

    from ..config import MethodConfig


def apply(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType, get_peft_model

    if not kinds.is_causal_lm(model):
        raise MethodError(f"method {cfg.name} needs a transformers causal LM: its learned virtual tokens go before "
                          "the input embeddings, attention mask and labels of a causal LM (peft's "
                          f"PeftModelForCausalLM), and {type(model).__name__} is not one; use lora, dora, ia3, "
                          "bitfit, freeze or full on it")
    common = dict(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=cfg.num_virtual_tokens)
    if cfg.name == "prompt_tuning":
        pcfg = PromptTuningConfig(**common)
    elif cfg.name == "p_tuning":
        pcfg = PromptEncoderConfig(**common, encoder_hidden_size=cfg.encoder_hidden_size)
    else:
        pcfg = PrefixTuningConfig(**common)
    return get_peft_model(model, pcfg)

