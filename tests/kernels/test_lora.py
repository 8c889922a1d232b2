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


def _two_steps(cached: bool) -> tuple[list[float], dict[str, torch.Tensor], int]:
    """Two optimizer steps of two micro-batches each, checkpointed layers, bf16 autocast, fused LoRA layers:
    (losses, trained weights after, adapter casts made)."""
    from slimtune.engine import step as engine_step
    from slimtune.kernels import lora_math

    model = _model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    lora.enable(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    gen = torch.Generator().manual_seed(3)
    casts, real = [0], torch.Tensor.to

    def counting(t, *args, **kw):  # adapter weights (fp32 parameters of LoRA) cast to bf16
        if isinstance(t, torch.nn.Parameter) and t.requires_grad and args and args[0] == torch.bfloat16:
            casts[0] += 1
        return real(t, *args, **kw)
    lora_math.ENABLED, losses = cached, []
    torch.Tensor.to = counting
    try:
        for _ in range(2):
            batches = [{"input_ids": (ids := torch.randint(0, VOCAB, (2, 23), generator=gen)),
                        "labels": ids.clone(), "attention_mask": torch.ones_like(ids)} for _ in range(2)]
            row = engine_step.step(model, batches, opt, sched, 1.0,
                                   context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            losses.append(row["loss"])
    finally:
        torch.Tensor.to, lora_math.ENABLED = real, True
    return losses, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, casts[0]


def test_each_adapter_is_cast_once_a_step_and_training_is_bit_identical():
    """cast_once (around engine/step.accumulate): 28 adapter matrices cast once per optimizer step instead of in
    every forward, recompute and backward of its two micro-batches; losses and trained weights bit-identical,
    the second step's casts made from the updated weights."""
    losses, weights, casts = _two_steps(cached=True)
    ref_losses, ref_weights, ref_casts = _two_steps(cached=False)
    assert casts == 2 * 28  # 14 fused layers x (A, B), once in each of the two steps
    assert ref_casts == 2 * 2 * 3 * 28  # two steps x two micro-batches x (forward, recompute, backward)
    assert losses == ref_losses and losses[1] != losses[0]
    for name, w in weights.items():
        assert torch.equal(w, ref_weights[name]), name


def test_outside_a_step_every_cast_is_new_and_inside_the_copy_is_shared():
    from slimtune.kernels import lora_math

    a = torch.nn.Parameter(torch.randn(4, 8))
    assert lora_math.cast(a, torch.bfloat16) is not lora_math.cast(a, torch.bfloat16)
    with lora_math.cast_once():
        one = lora_math.cast(a, torch.bfloat16)
        assert lora_math.cast(a, torch.bfloat16) is one and lora_math.cast(a, torch.float32) is not one
    with lora_math.cast_once():
        assert lora_math.cast(a, torch.bfloat16) is not one  # a new step: cast again
    assert lora_math._STEP is None
