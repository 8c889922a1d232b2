"""Liger's RMSNorm and SwiGLU (kernels/norm_mlp.py) against the modules' own forward on a GPU: per module,
outputs and input/weight gradients in bf16; on a LoRA model, the loss and every adapter gradient."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune import config, methods
from slimtune.engine import precision
from slimtune.kernels import norm_mlp

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not norm_mlp.available(),
                                reason="Liger-Kernel's Triton kernels need CUDA and liger-kernel installed "
                                       "(bench/gpu.sh installs the wheel); CPU checks: test_norm_mlp.py")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def _model():
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=2048, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)


def test_each_module_matches_its_own_forward():
    model = _model()
    layer = model.model.layers[0]
    x = torch.randn(2, 300, 512, device="cuda", dtype=torch.bfloat16)
    for module in (layer.input_layernorm, layer.mlp):
        outs = []
        for fused in (False, True):
            if fused:
                norm_mlp.enable(model)
            xi = x.clone().requires_grad_()
            y = module(xi)
            y.backward(torch.ones_like(y))
            w = next(module.parameters())
            outs.append((y.detach(), xi.grad, w.grad.clone()))
            model.zero_grad(set_to_none=True)
            norm_mlp.disable(model)
        for ref, got in zip(*outs):
            assert _rel(got, ref) < 1e-2, type(module).__name__


def test_lora_model_loss_and_gradients():
    ids = torch.randint(0, 2048, (2, 512), device="cuda")
    runs = []
    for fused in (False, True):
        model = _model()
        torch.manual_seed(1)
        model = methods.apply(model, config.MethodConfig(name="lora", r=16, alpha=32, target_modules=ALL))
        precision.cast_trainable(model, torch.float32)
        with torch.no_grad():  # B away from zero so every adapter has a gradient path of its own
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
        if fused:
            assert norm_mlp.enable(model) == 3 * 4 + 1
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((float(loss), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = runs
    assert abs(l1 - l0) / l0 < 1e-3
    worst = max(_rel(g1[k], g0[k]) for k in g0)
    print(f"loss {l0:.5f} vs {l1:.5f}; worst adapter gradient relative difference {worst:.2e}")
    assert worst < 3e-2
