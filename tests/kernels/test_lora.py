"""Fused LoRA linear (kernels/lora.py) against peft's module chain: outputs and every gradient in fp32
within 1e-5, under bf16 autocast within bf16 rounding, through a whole model; which layers it takes,
and that disable() puts peft's forward back."""
from __future__ import annotations

import pytest
import torch

from lora_checks import VOCAB, assert_fused_equals_peft, lora_model, loss_and_grads
from slimtune.kernels import lora


def _model(arch="llama", **kw):
    return lora_model(arch, **kw)


@pytest.mark.parametrize("arch, bias, n_bias", [("llama", "none", 0), ("qwen2", "all", 6)])
def test_fused_equals_peft_in_fp32(arch, bias, n_bias):
    """qwen2 has q/k/v biases: with bias=all they train, through the fused layer's bias gradient."""
    assert_fused_equals_peft(_model(arch, bias=bias), n_bias, grad_share=1e-6)


def test_fused_under_bf16_autocast_keeps_fp32_adapter_grads():
    model = _model()
    ids = torch.randint(0, VOCAB, (2, 29), generator=torch.Generator().manual_seed(2))
    ref = loss_and_grads(model, ids)  # fp32
    lora.enable(model)
    got = loss_and_grads(model, ids, autocast=True)
    assert abs(float(got[0] - ref[0])) < 2e-2 * float(ref[0])
    for name, g in got[2].items():
        assert g.dtype == torch.float32, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), ref[2][name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


def test_function_alone_equals_the_formula_with_bias_and_3d_input():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, requires_grad=True)
    w, bias = torch.randn(7, 12, requires_grad=True), torch.randn(7, requires_grad=True)
    a, b = torch.randn(3, 12, requires_grad=True), torch.randn(7, 3, requires_grad=True)
    out = lora.lora_linear(x, w, bias, a, b, 0.5)
    want = x @ w.T + bias + 0.5 * (x @ a.T) @ b.T
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, w, bias, a, b), g)
    ref = torch.autograd.grad(want, (x, w, bias, a, b), g)
    for x1, x2 in zip(got, ref):
        torch.testing.assert_close(x1, x2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", [dict(dropout=0.1), dict(name="dora")])
def test_layers_it_cannot_take_stay_peft(kw):
    model = _model(**kw)
    assert lora.enable(model) == 0


def test_disabled_adapter_falls_back_to_the_base_model():
    model = _model()
    ids = torch.randint(0, VOCAB, (1, 11))
    lora.enable(model)
    with model.disable_adapter():
        fused_off = model(input_ids=ids).logits
    lora.disable(model)
    with model.disable_adapter():
        peft_off = model(input_ids=ids).logits
    assert torch.equal(fused_off, peft_off)
