"""Tiled MLP (kernels/tiled_mlp.py) against the plain one (reference.swiglu_mlp and the modules' own forward):
outputs and every gradient over odd shapes, fp32 and bf16; LoRA inside the MLP, dropout replayed in the
recompute; the binding wraps what was there (Liger's forward included) and disable() gives it back; auto's
token threshold."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from slimtune import config, methods
from slimtune.kernels import reference, select, tiled_mlp

# fp32: slicing the rows changes only the summation order of the weights' gradients (a sum over slices of
# per-slice matmuls), so rounding a few ulps of the largest entries. bf16: the input gradient is the same
# matmul per row, but bf16 weights' .grad adds slice after slice in bf16 (8 bits of mantissa, 4e-3 of the
# running sum each time): measured up to 1.0% of the gradient's largest entry over these shapes, so 2% of it.
# (Trained weights are fp32 in slimtune, LoRA's A and B: there the fp32 tolerance applies.)
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}  # (rtol, atol as a share of the largest entry)


def _weights(hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g) * 0.1).to(dtype).requires_grad_() for s in
            ((inter, hidden), (inter, hidden), (hidden, inter))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, inter, rows", [((1, 123, 7), 19, 16), ((2, 431, 24), 56, 123), ((3, 7, 9), 31, 2),
                                                ((1, 50, 8), 16, 50)])
def test_tiled_equals_the_reference_in_output_and_every_gradient(dtype, shape, inter, rows):
    w = _weights(shape[-1], inter, dtype)
    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(1))).to(dtype).requires_grad_()
    grad = torch.randn(*shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    want = reference.swiglu_mlp(x, *w)
    want_grads = torch.autograd.grad(want, [x, *w], grad)
    got = tiled_mlp.tiled(lambda t: reference.swiglu_mlp(t, *w), x, rows, tuple(w))
    got.backward(grad)
    rtol, share = TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=share * float(want.detach().abs().max()))
    for name, g, t in zip(("x", "gate", "up", "down"), want_grads, [x, *w]):
        scale = float(g.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(t.grad, g, rtol=rtol, atol=share * scale, msg=name)


def test_weights_alone_trainable_still_get_their_gradient():
    """x needs no gradient (the first layer's input under frozen embeddings): backward must still run."""
    w = _weights(8, 16, torch.float32)
    x = torch.randn(1, 21, 8)
    tiled_mlp.tiled(lambda t: reference.swiglu_mlp(t, *w), x, 5, tuple(w)).sum().backward()
    want = torch.autograd.grad(reference.swiglu_mlp(x, *w).sum(), w)
    for t, g in zip(w, want):
        torch.testing.assert_close(t.grad, g, rtol=1e-5, atol=1e-6)


def test_the_recompute_runs_under_forwards_autocast():
    """Backward runs outside autocast; the slices' recompute must use the dtypes forward used (as checkpoint)."""
    w = _weights(8, 16, torch.float32)
    seen = []

    def forward(t):
        seen.append(torch.is_autocast_enabled("cpu"))
        return reference.swiglu_mlp(t, *w)

    x = torch.randn(1, 20, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tiled_mlp.tiled(forward, x, 7, tuple(w))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert seen == [True] * 6 and x.grad.dtype == torch.float32  # 3 slices forward, 3 recomputed
    seen.clear()
    tiled_mlp.tiled(forward, x, 7, tuple(w)).sum().backward()
    assert seen == [False] * 6


def test_tile_rows_splits_like_deepspeed():
    assert tiled_mlp.tile_rows(4096, 65536) == 4096  # 16 slices
    assert tiled_mlp.tile_rows(4096, 5000) == 2500  # 2 even slices, not 4096 + 904
    assert tiled_mlp.tile_rows(64, 7) == 7


def _lora_model(dropout=0.0):
    model = methods.apply(make_model(300), config.MethodConfig(r=4, alpha=8, dropout=dropout,
                                                               target_modules=["gate_proj", "up_proj", "down_proj"]))
    for name, p in model.named_parameters():  # B starts at 0: give it values so every gradient is tested
        if "lora_B" in name:
            p.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    return model


def _run(model, ids, seed=5):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _sliced(forward, x, rows, params=()):
    """The tiled forward's arithmetic with autograd through it (every slice's intermediates kept)."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.cat([forward(flat[i:i + rows]) for i in range(0, flat.shape[0], rows)])
    return out.reshape(*x.shape[:-1], out.shape[-1])


@pytest.mark.parametrize("dropout, checkpointed", [(0.0, False), (0.1, False), (0.0, True), (0.1, True)])
def test_a_lora_model_trains_the_same_tiled(dropout, checkpointed, monkeypatch):
    """LoRA's A and B inside the MLP get the same gradients, with and without gradient checkpointing (whose
    recompute runs the tiled forward again). Dropout draws its masks per slice, so the plain twin is the same
    slicing with autograd through it: equal gradients mean the recompute replayed the masks."""
    model = _lora_model(dropout)
    if checkpointed:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(0))
    assert tiled_mlp.enable(model, min_tokens=0) == 2 and tiled_mlp.enabled(model) == 2
    got = _run(model, ids)
    if dropout:
        monkeypatch.setattr(tiled_mlp, "tiled", _sliced)
    else:
        tiled_mlp.disable(model)
    want = _run(model, ids)
    assert abs(got[0] - want[0]) < 1e-5
    assert got[1].keys() == want[1].keys() and len(want[1]) == 12  # 2 layers x 3 projections x A, B
    for name in want[1]:
        assert float(want[1][name].abs().max()) > 0, name
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-6, msg=name)
    tiled_mlp.disable(model)
    assert tiled_mlp.enabled(model) == 0 and all("forward" not in m.__dict__ for m in model.modules()
                                                 if tiled_mlp.eligible(m))


def test_under_checkpointing_and_offload_the_gradients_are_the_plain_ones():
    """train's long-record setting: checkpointed layers whose saved inputs (the tiled MLP's x too) are moved
    off the device by engine/offload.py (on the CPU a copy stands in for the move)."""
    from slimtune.engine.offload import OffloadActivations

    model = _lora_model()
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(0, 300, (1, 150), generator=torch.Generator().manual_seed(0))
    want = _run(model, ids)
    tiled_mlp.enable(model, min_tokens=0)
    hooks = OffloadActivations(model, min_bytes=0, device_type="cpu")
    with hooks:
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    tiled_mlp.disable(model)
    assert len(hooks.moved) > 0 and abs(float(loss) - want[0]) < 1e-5
    for name, g in want[1].items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, g, rtol=1e-4, atol=1e-6, msg=name)


def test_short_forwards_and_no_grad_are_not_tiled(monkeypatch):
    model = make_model(300)
    calls = []
    monkeypatch.setattr(tiled_mlp, "tiled", lambda *a, **k: calls.append(1) or a[0](a[1]))
    tiled_mlp.enable(model, min_tokens=100)
    model(input_ids=torch.zeros(1, 100, dtype=torch.long))  # at the threshold: plain
    assert calls == []
    model(input_ids=torch.zeros(1, 101, dtype=torch.long))  # 2 slices of 51 and 50 (hidden 64)
    assert len(calls) == 2  # one per layer
    with torch.no_grad():  # evaluation keeps nothing for backward anyway
        model(input_ids=torch.zeros(1, 300, dtype=torch.long))
    assert len(calls) == 2
    tiled_mlp.disable(model)


def test_it_wraps_a_forward_bound_before_and_gives_it_back():
    """norm_mlp binds Liger's SwiGLU to the instance: tiling slices that one, and disable leaves it bound."""
    model = make_model(300)
    mlp = model.model.layers[0].mlp
    bound = torch.zeros_like
    mlp.forward = bound
    tiled_mlp.enable(model, min_tokens=0)
    out = mlp(torch.ones(1, 200, 64, requires_grad=True))
    assert float(out.abs().sum()) == 0.0  # the bound forward ran, slice by slice
    tiled_mlp.disable(model)
    assert mlp.forward is bound and "forward" not in model.model.layers[1].mlp.__dict__


def test_the_config_key_and_the_record():
    model = make_model(300)
    try:
        k = select.enable(model, config.TrainConfig(tiled_mlp="on"), "cpu")
        assert k.tiled_mlp == 2
        select.disable(model)
        assert tiled_mlp.enabled(model) == 0
        assert select.enable(model, config.TrainConfig(), "cpu").tiled_mlp == 0  # auto: CUDA only
    finally:
        select.disable(model)
    assert select.tiled_mlp_from("auto", "cuda") == select.TILE_TOKENS == 24576
    assert select.tiled_mlp_from("on", "cpu") == 0 and select.tiled_mlp_from("auto", "cpu") is None
    assert select.tiled_mlp_from("off", "cuda") is None
