"""engine/recompute.lean, the checkpoint transformers' layers call: one autograd node a layer, its first forward
without autograd and only its inputs saved, the recompute replaying the forward's random numbers and autocast.
Reference: the same model unchecked, and torch's non-reentrant checkpoint (LEAN off)."""
from __future__ import annotations

import pytest
import torch

import slimtune
from conftest import make_model
from slimtune import config
from slimtune.engine import recompute

METHOD = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.2,
          "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def _model(checkpointing: bool, lean: bool, monkeypatch) -> torch.nn.Module:
    monkeypatch.setattr(recompute, "LEAN", lean)
    cfg = config.from_dict({"method": METHOD, "train": {"gradient_checkpointing": checkpointing, "precision": "fp32"}})
    model = slimtune.prepare(make_model(300), cfg, "cpu", log=lambda *_: None).model
    model.train()
    return model


def _grads(model: torch.nn.Module, autocast: bool = False) -> tuple[float, dict]:
    torch.manual_seed(5)  # the dropout masks: the same draws in every variant's forward
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("autocast", [False, True])
def test_lean_gives_the_unchecked_models_loss_and_gradients_with_dropout(monkeypatch, autocast):
    runs = {name: _grads(_model(ckpt, lean, monkeypatch), autocast)
            for name, ckpt, lean in (("plain", False, False), ("torch", True, False), ("lean", True, True))}
    loss, want = runs["plain"]
    assert len(want) == 2 * 7 * 2  # A and B of 7 projections in 2 layers: every adapter got a gradient
    tol = dict(rtol=2e-2, atol=1e-3) if autocast else dict(rtol=1e-5, atol=1e-7)
    for name in ("torch", "lean"):
        got_loss, got = runs[name]
        assert got_loss == pytest.approx(loss, rel=1e-6)
        assert got.keys() == want.keys()
        for key, g in want.items():
            # B's, the first layer's too (no input there requires grad); A's are zero while B is its zero init
            assert float(g.abs().max()) > 0 or "lora_A" in key, key
            torch.testing.assert_close(got[key], g, **tol, msg=f"{name} {key}")


def _nodes(loss: torch.Tensor) -> list[str]:
    """The autograd nodes a forward recorded (what its backward walks), by name."""
    seen, todo, names = set(), [loss.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


def test_lean_records_one_node_per_layer_where_torch_records_every_op_of_the_layer(monkeypatch):
    got = {}
    for name, lean in (("torch", False), ("lean", True)):
        model = _model(True, lean, monkeypatch)
        ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
        got[name] = _nodes(model(input_ids=ids, labels=ids).loss)
    assert got["lean"].count("_RecomputeBackward") == 2 and "_RecomputeBackward" not in got["torch"]
    assert len(got["torch"]) - len(got["lean"]) >= 2 * 20  # each layer's ops: norms, projections, attention, MLP


def test_lean_falls_back_to_torchs_checkpoint_where_traced_or_sharded(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda run, *a, **k: calls.append(k) or run(*a))
    x = torch.randn(3, 4, requires_grad=True)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = recompute.lean(lambda t: t * 2, x)
    assert calls == [recompute.KWARGS] and torch.equal(out, x * 2)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    out = recompute.lean(lambda t: t * 2, x)
    assert len(calls) == 1 and out.grad_fn is not None and type(out.grad_fn).__name__ == "_RecomputeBackward"


def test_lean_recomputes_under_the_forwards_autocast_and_returns_no_gradient_to_inputs_that_need_none():
    w = torch.randn(4, 4, requires_grad=True)
    frozen = torch.randn(3, 4)  # a frozen embedding's output: no gradient, yet w's must arrive
    dtypes = []

    def layer(t):
        y = t @ w
        dtypes.append(y.dtype)
        return y

    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = recompute.lean(layer, frozen)
    out.float().sum().backward()
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the forward and its recompute in backward
    assert w.grad is not None and frozen.grad is None
    want = frozen.T @ torch.ones(3, 4)  # d sum(t @ w) / dw
    torch.testing.assert_close(w.grad, want, rtol=2e-2, atol=5e-2)
