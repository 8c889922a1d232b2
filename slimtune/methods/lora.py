"""LoRA through peft: low-rank adapters on the targeted Linear layers, saved in peft's own format."""
from __future__ import annotations

from . import targets


def apply(model, cfg):
    """Wrap the model with LoRA adapters; only the adapters are trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    lcfg = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets.resolve(model, cfg.target_modules),
    )
    return get_peft_model(model, lcfg)


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapter_state(model) -> dict:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)
