"""The CUDA fast path of packed attention (torch.nn.attention.varlen.varlen_attn) against the plain-PyTorch
reference, for the GPU session: forward and every gradient in bf16, GQA, odd record lengths, the
installed varlen_attn's signature, and a tiny model's packed vs unpacked loss on the GPU."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import make_model
from slimtune.data import pack
from slimtune.data.collate import collate
from slimtune.data.encode import IGNORE, Encoded
from slimtune.engine.loop import accumulate
from slimtune.kernels import attention, reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or attention._varlen_fn() is None,
                                reason="varlen flash attention needs CUDA and torch >= 2.10 "
                                       "(torch.nn.attention.varlen); the CPU path is tests/kernels/test_attention.py")
LENGTHS = [[7], [123, 431, 7, 1], [1024, 7, 513, 123]]


def _qkv(lengths, heads, kv_heads, d, dtype, seed=0):
    torch.manual_seed(seed)
    t = sum(lengths)
    q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=dtype, requires_grad=True)
               for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device="cuda")
    return q, k, v, cu


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("heads, kv_heads, d", [(4, 4, 64), (32, 8, 64), (16, 2, 128)])
def test_varlen_equals_reference_in_bf16(lengths, heads, kv_heads, d):
    """bf16 has 8 mantissa bits: the kernel's error against an fp32 reference must be no worse than that of
    PyTorch's own bf16 SDPA on the same inputs (2x plus 1e-3 of slack for a different summation order)."""
    q, k, v, cu = _qkv(lengths, heads, kv_heads, d, torch.bfloat16)
    scale = d ** -0.5 * 0.9  # not the default, so a dropped scale shows
    out = attention.varlen(q, k, v, cu, max(lengths), scale)  # (1, T, H, D)
    exact = reference.packed_attention(q.float(), k.float(), v.float(), cu, scale).transpose(1, 2)
    plain = reference.packed_attention(q, k, v, cu, scale).transpose(1, 2)  # bf16 SDPA per record
    assert out.dtype == torch.bfloat16 and out.shape == exact.shape
    assert _err(out, exact) <= 2 * _err(plain, exact) + 1e-3
    grad = torch.randn_like(exact)
    fast = torch.autograd.grad(out.float(), (q, k, v), grad)
    ref32 = torch.autograd.grad(exact, (q, k, v), grad)
    ref16 = torch.autograd.grad(plain.float(), (q, k, v), grad)
    for name, a, b, c in zip("qkv", fast, ref32, ref16):
        assert _err(a, b) <= 2 * _err(c, b) + 1e-2, name


def test_sliding_window_and_the_older_signature_paths(monkeypatch):
    q, k, v, cu = _qkv([123, 431, 7], 8, 2, 64, torch.bfloat16)
    exact = reference.packed_attention(q.float(), k.float(), v.float(), cu, 0.1, window=50).transpose(1, 2)
    if "window_size" in attention._varlen_params():
        assert _err(attention.varlen(q, k, v, cu, 431, 0.1, window=50), exact) < 2e-2
    full = reference.packed_attention(q.float(), k.float(), v.float(), cu, 0.1).transpose(1, 2)
    # without enable_gqa / scale in the signature: kv heads repeated, query pre-scaled; same answer
    native = attention.varlen(q, k, v, cu, 431, 0.1)
    names = attention._varlen_params() - {"enable_gqa", "scale"}
    monkeypatch.setattr(attention, "_varlen_params", lambda: names)
    assert _err(attention.varlen(q, k, v, cu, 431, 0.1), full) < 2e-2
    assert _err(native, full) < 2e-2


def test_kernel_gqa_check_and_the_path_it_opens(monkeypatch):
    """check_kernel_gqa on this GPU (printed); where it holds, fewer kv heads go to the kernel as they are and the
    packed attention still equals the reference."""
    works = "enable_gqa" in attention._varlen_params() or attention.check_kernel_gqa()
    print(f"torch {torch.__version__}: grouped-query attention without repeated heads: {works}")
    monkeypatch.setattr(attention, "KERNEL_GQA", works)
    q, k, v, cu = _qkv([123, 431, 7], 8, 2, 64, torch.bfloat16)
    full = reference.packed_attention(q.float(), k.float(), v.float(), cu, 0.1).transpose(1, 2)
    assert _err(attention.varlen(q, k, v, cu, 431, 0.1), full) < 2e-2


def test_what_the_installed_varlen_attn_offers():
    """Prints what the GPU session needs to know; fails only if causal masking has no way in."""
    params = attention._varlen_params()
    print(f"torch {torch.__version__}: varlen_attn parameters {sorted(params)}")
    assert "window_size" in params or "is_causal" in params
    q, k, v, cu = _qkv([123, 431], 8, 2, 64, torch.bfloat16)
    qt, kt, vt = (t[0].transpose(0, 1) for t in (q, k, v))
    try:  # does the kernel take fewer kv heads as they are (no repeat) even without enable_gqa?
        kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        out = attention._varlen_fn()(qt, kt, vt, cu, cu, 431, 431, **kw)
        full = reference.packed_attention(q.float(), k.float(), v.float(), cu).transpose(1, 2)[0]
        print(f"native GQA without enable_gqa: works, max error {_err(out, full):.3g}")
    except Exception as err:  # noqa: BLE001 - a report, not a requirement
        print(f"native GQA without enable_gqa: refused ({type(err).__name__}: {err})")


def test_fp32_activations_under_autocast_take_the_fast_path():
    q, k, v, cu = _qkv([123, 7], 8, 2, 64, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert attention._fast(q, 0.0, None)
        out = attention.varlen(q, k, v, cu, 123)
    assert out.dtype == torch.bfloat16
    assert _err(out, reference.packed_attention(q, k, v, cu).transpose(1, 2)) < 2e-2
    assert not attention._fast(q, 0.0, None)  # fp32 without autocast: the reference path
    assert not attention._fast(q.half(), 0.1, None)  # attention dropout: the reference path


def _records(lengths, seed=0):
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(300) for _ in range(n)]
        out.append(Encoded(ids, [IGNORE] * (n // 3) + ids[n // 3:]))
    return out


def test_tiny_model_packed_vs_unpacked_on_the_gpu():
    """bf16 weights: the same loss within bf16 noise (measured on CPU fp32: equal within 1e-6), every
    gradient within 5% of its largest entry, and boundaries exact."""
    model = make_model(300).to("cuda", torch.bfloat16).train()
    records = _records([7, 123, 31, 200, 5])
    dev = lambda b: {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}  # noqa: E731
    loss, _ = accumulate(model, [dev(collate(records, 0))])
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    attention.enable(model)
    packed_loss, _ = accumulate(model, [dev(pack.collate(records))])
    assert packed_loss == pytest.approx(loss, rel=1e-2)
    for n, p in model.named_parameters():
        assert _err(p.grad, grads[n]) <= 0.05 * float(grads[n].abs().max()) + 1e-3, n
    with torch.no_grad():
        base = model.model(**{k: v for k, v in dev(pack.collate(records)).items() if k != "labels"})
        changed = [Encoded([(x + 1) % 300 for x in records[0].input_ids], records[0].labels)] + records[1:]
        other = model.model(**{k: v for k, v in dev(pack.collate(changed)).items() if k != "labels"})
    assert torch.equal(base.last_hidden_state[0, 7:], other.last_hidden_state[0, 7:])
    attention.disable(model)


class _Attn(torch.nn.Module):
    """What transformers' SDPA call reads of an attention module: causal, and its key/value head groups."""
    is_causal = True

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups


@pytest.mark.parametrize("one_record", ["sdpa", "cudnn"])
@pytest.mark.parametrize("length", [7, 1000, 4096])
def test_one_record_through_sdpa_equals_the_reference_in_bf16(monkeypatch, one_record, length):
    """attention.ONE_RECORD: a row of one record through SDPA (torch's backend, or cuDNN's first) is as close to an
    fp32 reference as the varlen kernel is, forward and every gradient; a row of two records stays on varlen."""
    heads, kv_heads, d = 32, 8, 128
    q, k, v, cu = _qkv([length], heads, kv_heads, d, torch.bfloat16)
    scale = d ** -0.5 * 0.9
    exact = reference.packed_attention(q.float(), k.float(), v.float(), cu, scale).transpose(1, 2)
    base = attention.varlen(q, k, v, cu, length, scale)
    monkeypatch.setattr(attention, "ONE_RECORD", one_record)
    out, _ = attention.attention(_Attn(heads // kv_heads), q, k, v, None, scaling=scale, cu_seq_lens_q=cu,
                                 max_length_q=length)
    assert out.shape == exact.shape and out.dtype == torch.bfloat16
    assert _err(out, exact) <= 2 * _err(base, exact) + 1e-3
    grad = torch.randn_like(exact)
    got, want, varlen = (torch.autograd.grad(o.float(), (q, k, v), grad) for o in (out, exact, base))
    for name, a, b, c in zip("qkv", got, want, varlen):
        assert _err(a, b) <= 2 * _err(c, b) + 1e-2, name
    q2, k2, v2, cu2 = _qkv([length, 5], heads, kv_heads, d, torch.bfloat16)
    called = []
    monkeypatch.setattr(attention, "varlen", lambda *a, **kw: called.append(a[3].shape[0]) or base)
    attention.attention(_Attn(heads // kv_heads), q2, k2, v2, None, scaling=scale, cu_seq_lens_q=cu2,
                        max_length_q=length)
    assert called == [3]
