"""Phi-3 / Phi-4 (model_type phi3): fused qkv_proj and gate_up_proj as targets, counted as peft counts them."""
from __future__ import annotations

import pytest
import torch

from slimtune.config import MethodConfig
from slimtune.methods import apply, count_parameters
from slimtune.methods.targets import TargetError, describe, resolve

HIDDEN, LAYERS, HEADS, KV, HEAD_DIM, FFN = 64, 2, 4, 2, 16, 128


def phi3():
    from transformers import AutoModelForCausalLM, Phi3Config

    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=400, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                     num_attention_heads=HEADS, num_key_value_heads=KV, max_position_embeddings=128,
                     pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return AutoModelForCausalLM.from_config(cfg)


def test_default_and_all_linear_name_the_fused_modules():
    model = phi3()
    assert resolve(model, []) == ["qkv_proj"]
    assert resolve(model, ["all-linear"]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert "default (method.target_modules: []) = qkv_proj" in describe(model)


def test_split_names_point_at_the_fused_module():
    with pytest.raises(TargetError) as err:
        resolve(phi3(), ["q_proj", "up_proj"])
    assert str(err.value).startswith("method.target_modules: q_proj, up_proj match no Linear module (q_proj is part "
                                     "of qkv_proj in this architecture) (up_proj is part of gate_up_proj in this "
                                     "architecture); available: ")


QKV_OUT = (HEADS + 2 * KV) * HEAD_DIM  # 128: q, k and v stacked
PER_LAYER = {"qkv_proj": (HIDDEN, QKV_OUT), "o_proj": (HIDDEN, HIDDEN), "gate_up_proj": (HIDDEN, 2 * FFN),
             "down_proj": (FFN, HIDDEN)}


@pytest.mark.parametrize("targets,peft_targets", [([], ["qkv_proj"]), (["all-linear"], "all-linear")])
def test_trainable_counts_equal_peft(targets, peft_targets):
    from peft import LoraConfig, get_peft_model

    r = 4
    ours = count_parameters(apply(phi3(), MethodConfig(name="lora", r=r, dropout=0.0, target_modules=targets)))
    theirs = count_parameters(get_peft_model(phi3(), LoraConfig(r=r, lora_alpha=8, target_modules=peft_targets,
                                                                task_type="CAUSAL_LM")))
    names = resolve(phi3(), targets)
    by_hand = LAYERS * sum(r * (i + o) for n, (i, o) in PER_LAYER.items() if n in names)
    assert ours[0] == theirs[0] == by_hand == (1_536 if targets == [] else 6_656)
    assert ours[1] == theirs[1]
