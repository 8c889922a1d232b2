"""kernels/norm_mlp.py on the CPU: which modules it takes, that it patches instances only and gives them
back, and the clear errors; the numbers (Liger's Triton kernels vs the modules' own forward) are checked on
a GPU by tests/kernels/test_norm_mlp_gpu.py."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from slimtune.config import ConfigError
from slimtune.kernels.select import use_fused_norm_mlp
from slimtune.kernels import norm_mlp


def test_takes_every_norm_and_mlp_and_gives_them_back(monkeypatch):
    monkeypatch.setattr(norm_mlp, "available", lambda: True)
    model, other = make_model(300), make_model(300)
    ids = torch.randint(0, 300, (2, 9))
    before = model(input_ids=ids).logits
    layers = model.config.num_hidden_layers
    assert norm_mlp.enable(model) == 3 * layers + 1  # two norms and the MLP per layer, the final norm
    assert norm_mlp.enable(model) == 3 * layers + 1  # idempotent
    assert model.model.layers[0].mlp.forward.__func__ is norm_mlp._mlp_forward
    assert "forward" not in vars(other.model.layers[0].mlp)  # the class and other models are untouched
    norm_mlp.disable(model)
    assert not any("forward" in vars(m) for m in model.modules())
    assert torch.equal(model(input_ids=ids).logits, before)


def test_other_shapes_keep_their_forward(monkeypatch):
    monkeypatch.setattr(norm_mlp, "available", lambda: True)
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    assert norm_mlp.enable(model) == 0


def test_clear_errors(monkeypatch):
    monkeypatch.setattr(norm_mlp, "available", lambda: False)
    with pytest.raises(ImportError, match="pip install liger-kernel"):
        norm_mlp.enable(make_model(300))
    assert not use_fused_norm_mlp("auto", "cuda")  # auto without Liger: off, no error
    with pytest.raises(ConfigError, match="CUDA only"):
        use_fused_norm_mlp("on", "cpu")
    assert not use_fused_norm_mlp("auto", "cpu") and not use_fused_norm_mlp("off", "cuda")
    monkeypatch.setattr(norm_mlp, "available", lambda: True)
    wide, narrow = torch.nn.Module(), make_model(300)
    wide.config = type("C", (), {"hidden_size": 4096})()
    assert use_fused_norm_mlp("auto", "cuda", wide) and not use_fused_norm_mlp("auto", "cuda", narrow)
