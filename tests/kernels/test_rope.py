"""kernels/rope.py on the CPU: while (and only while) an enabled model's attention runs, transformers'
module-level apply_rotary_pos_emb is the fused one; other models and the module itself are left as they
were. The kernel's numbers: tests/kernels/test_rope_gpu.py."""
from __future__ import annotations

import pytest
import torch
from transformers.models.llama import modeling_llama

from conftest import make_model
from slimtune.kernels import rope


@pytest.fixture
def counted(monkeypatch):
    calls = []
    own = modeling_llama.apply_rotary_pos_emb

    def fake(q, k, cos, sin, unsqueeze_dim=1):
        calls.append(q.shape)
        return own(q, k, cos, sin, unsqueeze_dim)
    monkeypatch.setattr(rope, "_fused", fake)
    monkeypatch.setattr(rope, "available", lambda: True)
    return calls


def test_only_the_enabled_model_uses_it(counted):
    model, other = make_model(300), make_model(300)
    ids = torch.randint(0, 300, (2, 9))
    before = model(input_ids=ids).logits
    own = modeling_llama.apply_rotary_pos_emb
    assert rope.enable(model) == model.config.num_hidden_layers
    assert rope.enable(model) == model.config.num_hidden_layers  # idempotent
    assert torch.equal(model(input_ids=ids).logits, before)  # same function underneath here: same numbers
    assert len(counted) == model.config.num_hidden_layers
    assert modeling_llama.apply_rotary_pos_emb is own  # put back after every forward
    other(input_ids=ids)
    assert len(counted) == model.config.num_hidden_layers  # the other model kept transformers' RoPE
    rope.disable(model)
    model(input_ids=ids)
    assert len(counted) == model.config.num_hidden_layers and not any("forward" in vars(m) for m in model.modules())


def test_checkpointed_recompute_uses_it_too(counted):
    model = make_model(300)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    rope.enable(model)
    ids = torch.randint(0, 300, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    assert len(counted) == 2 * model.config.num_hidden_layers  # forward + recompute


def test_an_error_inside_puts_the_function_back(counted, monkeypatch):
    model = make_model(300)
    rope.enable(model)
    own = modeling_llama.apply_rotary_pos_emb
    with pytest.raises(Exception):
        model(input_ids=torch.full((1, 3), 10_000))  # out-of-range token id
    model.model.layers[0].self_attn.q_proj.weight.data = torch.zeros(1)  # a broken layer, inside attention
    with pytest.raises(RuntimeError):
        model(input_ids=torch.randint(0, 300, (1, 4)))
    assert modeling_llama.apply_rotary_pos_emb is own


def test_needs_liger(monkeypatch):
    monkeypatch.setattr(rope, "available", lambda: False)
    with pytest.raises(ImportError, match="liger-kernel"):
        rope.enable(make_model(300))
