"""Liger's RoPE (kernels/rope.py) against transformers' apply_rotary_pos_emb on a GPU: q, k and their
gradients in bf16, with batch cos/sin as packed rows give them (positions restarting per record)."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from slimtune.kernels import rope

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not rope.available(),
                                reason="Liger-Kernel's Triton RoPE needs CUDA and liger-kernel installed; the "
                                       "binding is checked on the CPU by tests/kernels/test_rope.py")


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("heads, kv_heads, d", [(32, 8, 64), (32, 8, 128)])
def test_rope_matches_transformers(heads, kv_heads, d):
    torch.manual_seed(0)
    t = 777
    positions = torch.cat([torch.arange(n) for n in (300, 400, 77)]).cuda()[None]  # packed: restarts
    inv = 1.0 / (500000 ** (torch.arange(0, d, 2, device="cuda").float() / d))
    freqs = positions[..., None].float() * inv
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos().bfloat16(), emb.sin().bfloat16()
    q0 = torch.randn(1, heads, t, d, device="cuda", dtype=torch.bfloat16)
    k0 = torch.randn(1, kv_heads, t, d, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (modeling_llama.apply_rotary_pos_emb, rope._fused):
        q, k = q0.clone().requires_grad_(), k0.clone().requires_grad_()
        qo, ko = fn(q, k, cos, sin)
        (qo.float().square().sum() + ko.float().sum()).backward()
        outs.append((qo.detach(), ko.detach(), q.grad, k.grad))
    for ref, got in zip(*outs):
        assert _rel(got, ref) < 1e-2
