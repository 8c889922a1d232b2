"""The memory estimator on mixture-of-experts configs: every expert resident in the weights (and their LoRA
parameters and AdamW state), activations for the top-k experts a token runs through, and the W + BA copies
peft forms for LoRA on fused expert weights (train.fused_lora=off; on, kernels/expert_lora.py forms none)."""
from __future__ import annotations

import warnings

import pytest

from slimtune import config, methods
from slimtune.engine import memory, moe_memory

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True)
MOE = {"qwen3_moe": dict(num_experts=4, moe_intermediate_size=32), "mixtral": dict(num_local_experts=4)}


def _mcfg(arch: str, top_k: int = 2):
    from transformers import AutoConfig

    return AutoConfig.for_model(arch, **SHAPE, num_experts_per_tok=top_k, **MOE[arch])


def _cfg(**train) -> config.Config:
    cfg = config.Config()
    cfg.method = config.MethodConfig(r=4, dropout=0.0)
    cfg.train = config.TrainConfig(**{"precision": "fp32", "micro_batch_size": 2, "packing": "off", **train})
    cfg.data.max_len = 16
    return cfg


@pytest.mark.parametrize("arch", list(MOE))
def test_weight_and_lora_bytes_are_the_real_models(arch):
    from transformers import AutoModelForCausalLM

    est = memory.estimate(_cfg(), mcfg=_mcfg(arch))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = methods.apply(AutoModelForCausalLM.from_config(_mcfg(arch)), _cfg().method)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n and "lora" not in n)
    assert est.weights == frozen and experts > frozen / 2  # all 4 experts of both layers resident
    assert est.trainable == trained and est.optimizer == 2 * trained  # the experts' LoRA and its AdamW state
    assert trained > 2 * 4 * 4 * (64 + 64) * 4  # more than the attention's LoRA could hold


@pytest.mark.parametrize("arch", list(MOE))
def test_activations_grow_with_the_experts_a_token_runs_through(arch):
    each = MOE[arch].get("moe_intermediate_size", 128)
    assert [moe_memory.ffn_width(_mcfg(arch, k)) for k in (1, 2, 4)] == [each, 2 * each, 4 * each]
    acts = {k: memory.estimate(_cfg(gradient_checkpointing=False), mcfg=_mcfg(arch, k)).activations for k in (1, 2, 4)}
    tokens, layers = 2 * 16, 2
    step = tokens * layers * memory.LAYER_COEF["lora"] * each * 2  # fp32: twice the bf16 coefficient's bytes
    assert acts[2] - acts[1] == pytest.approx(step) and acts[4] - acts[2] == pytest.approx(2 * step)


def test_lora_on_fused_experts_counts_the_w_plus_ba_copies():
    """peft's path (train.fused_lora=off), per layer: gate_up [4, 64, 64] + down [4, 64, 32] fp32 = 98,304 bytes
    formed each forward, kept for backward: both layers' without checkpointing, one with it, plus the gradient of
    one."""
    stack = (4 * 64 * 64 + 4 * 64 * 32) * 4
    for ckpt, copies in ((False, 3), (True, 2)):
        adapted = memory.estimate(_cfg(gradient_checkpointing=ckpt, fused_lora="off"), mcfg=_mcfg("qwen3_moe"))
        cfg = _cfg(gradient_checkpointing=ckpt, fused_lora="off")
        cfg.method.target_modules = ["q_proj", "v_proj"]  # the experts left out: no copies
        plain = memory.estimate(cfg, mcfg=_mcfg("qwen3_moe"))
        assert adapted.activations - plain.activations == pytest.approx(copies * stack)
        assert adapted.activations_other - plain.activations_other == pytest.approx((5 - copies) * stack)
        assert [n for n in adapted.notes if n.startswith("LoRA on fused experts")] == [
            "LoRA on fused experts: W + BA of a layer's expert stack (0.00 GiB) is formed each forward and kept for "
            f"backward ({'one layer at a time with' if ckpt else 'every layer without'} checkpointing)"]
        assert not plain.notes


def test_a_dense_model_keeps_its_intermediate_size():
    from transformers import AutoConfig

    assert moe_memory.ffn_width(AutoConfig.for_model("llama", **SHAPE)) == 128


def test_qlora_packs_the_fused_experts_into_nf4_beside_the_linears():
    """Qwen3-MoE, 2 layers: attention q 64x64, k 32x64, v 32x64, o 64x64 per layer and the experts' gate_up
    [4, 64, 64] + down [4, 64, 32] per layer in NF4; embedding (tied), norms and routers in bf16."""
    cfg = _cfg(precision="bf16")
    cfg.method.name = "qlora"
    est = memory.estimate(cfg, mcfg=_mcfg("qwen3_moe"))
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4 bits + an 8-bit absmax per 64 + an fp32 scale per 256 absmax
    attention = 2 * (64 * 64 + 32 * 64 + 32 * 64 + 64 * 64)
    stacks = 2 * (4 * 64 * 64 + 4 * 64 * 32)
    dense = 300 * 64 + 2 * (64 + 64 + 16 + 16) + 64 + 2 * 4 * 64  # embedding, norms (q/k norms too), routers
    assert est.weights == pytest.approx((attention + stacks) * nf4 + dense * 2)
    assert moe_memory.NF4_BYTES == nf4
    cfg.method.name = "lora"
    assert memory.estimate(cfg, mcfg=_mcfg("qwen3_moe")).weights == pytest.approx((attention + stacks + dense) * 2)


def test_qlora_counts_the_dequantized_stack_w_plus_ba_is_formed_from():
    """peft's path, with checkpointing: one layer's W + BA and its gradient (bf16), plus the largest stack
    dequantized while W + BA is formed (gate_up, [4, 64, 64])."""
    cfg = _cfg(precision="bf16", gradient_checkpointing=True, fused_lora="off")
    cfg.method.name = "qlora"
    adapted = memory.estimate(cfg, mcfg=_mcfg("qwen3_moe"))
    cfg.method.target_modules = ["q_proj", "v_proj"]  # the experts left out: no copies
    plain = memory.estimate(cfg, mcfg=_mcfg("qwen3_moe"))
    stack, gate_up = (4 * 64 * 64 + 4 * 64 * 32) * 2, 4 * 64 * 64 * 2
    assert adapted.activations - plain.activations == pytest.approx(2 * stack + gate_up)
    assert adapted.notes[-1].endswith("checkpointing), from a dequantized stack (0.00 GiB)")


@pytest.mark.parametrize("name", ["lora", "qlora"])
@pytest.mark.parametrize("ckpt", [False, True])
def test_the_per_expert_path_holds_no_w_plus_ba(name, ckpt):
    """train.fused_lora=on: kernels/expert_lora.py forms no [experts, out, in] delta and no gradient of one; qlora
    still dequantizes one stack at a time (the largest: gate_up, [4, 64, 64] bf16)."""
    cfg = _cfg(precision="bf16", gradient_checkpointing=ckpt)
    cfg.train.fused_lora = "on"
    cfg.method.name = name
    adapted = memory.estimate(cfg, mcfg=_mcfg("qwen3_moe"))
    cfg.method.target_modules = ["q_proj", "v_proj"]
    plain = memory.estimate(cfg, mcfg=_mcfg("qwen3_moe"))
    dense = 4 * 64 * 64 * 2 if name == "qlora" else 0
    assert adapted.activations - plain.activations == pytest.approx(dense)
    assert adapted.activations_other - plain.activations_other == pytest.approx(dense)
    assert [n for n in adapted.notes if n.startswith("LoRA on fused experts")] == [
        "LoRA on fused experts: per expert from the low-rank factors (no W + BA)"
        + (", over one dequantized stack at a time (0.00 GiB)" if dense else "")]


def test_pissa_counts_the_linear_layers_it_adapts_and_no_experts():
    """PiSSA leaves fused expert weights alone by default (peft adapts them with plain LoRA only): the estimate
    counts the trainable parameters the run has (fp32, 4 bytes each) and no W + BA copies."""
    from transformers import AutoModelForCausalLM

    cfg = _cfg()
    cfg.method.name = "pissa"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        real = methods.apply(AutoModelForCausalLM.from_config(_mcfg("qwen3_moe")), cfg.method)
    est = memory.estimate(cfg, mcfg=_mcfg("qwen3_moe"))
    assert est.trainable == 4 * sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert not [n for n in est.notes if n.startswith("LoRA on fused experts")], est.notes
