"""Checkpointing without enable_input_require_grads (engine/recompute.py): transformers adds that hook with
checkpointing and peft again when it wraps a checkpointed model; slimtune takes it off, so the frozen embedding
output stays a plain tensor that the offload of layer inputs frees, no gradient is made for it, and the adapters'
gradients are the same."""
from __future__ import annotations

import weakref

import torch

import slimtune
from conftest import make_model
from slimtune import config
from slimtune.engine.offload import OffloadActivations
from slimtune.engine.recompute import enable_checkpointing

CFG = config.from_dict({"method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                        "train": {"gradient_checkpointing": True, "precision": "fp32"}})


def _step(model, hooks: OffloadActivations) -> tuple[dict, bool, bool]:
    """(the adapters' gradients, whether the embedding output needed a gradient, whether it was still alive
    between forward and backward) for one step with the layer inputs offloaded."""
    model.zero_grad(set_to_none=True)
    seen = {}
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.update(out=weakref.ref(o),
                                                                                             grad=o.requires_grad))
    ids = torch.randint(0, 300, (1, 96), generator=torch.Generator().manual_seed(0))
    with hooks:
        loss = model(input_ids=ids, labels=ids).loss
    alive = seen["out"]() is not None
    loss.backward()
    handle.remove()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, seen["grad"], alive


def test_prepare_leaves_the_embedding_output_frozen_and_freed_with_the_same_gradients():
    torch.manual_seed(0)
    model = slimtune.prepare(make_model(300), CFG, "cpu", log=lambda *_: None).model
    assert not model.get_input_embeddings()._forward_hooks  # neither transformers' hook nor peft's
    hooks = OffloadActivations(model, min_bytes=0, device_type="cpu")
    got, needs_grad, alive = _step(model, hooks)
    assert (needs_grad, alive) == (False, False)
    assert [shape for shape, _ in hooks.moved].count((1, 96, 64)) == 2 + 1  # each layer's input, the final norm's
    model.get_base_model().enable_input_require_grads()  # what transformers and peft left on before
    want, needs_grad, alive = _step(model, OffloadActivations(model, min_bytes=0, device_type="cpu"))
    assert (needs_grad, alive) == (True, True)  # kept by its gradient's accumulator all step
    assert got.keys() == want.keys() and len(want) == 8
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_turned_on_later_takes_the_hook_off_too():
    """fit turns checkpointing on itself when its plan wants it and prepare ran without (match_checkpointing)."""
    model = make_model(300)
    assert enable_checkpointing(model, CFG.method, log=lambda _: None)
    assert not model.get_input_embeddings()._forward_hooks and not getattr(model, "_require_grads_hooks", None)


def test_a_models_own_code_keeps_the_hook():
    """A class outside transformers (a model's own code, trust_remote_code) may checkpoint reentrant itself,
    where a layer whose input needs no gradient gives its adapters none: the hook stays there."""
    from slimtune.engine.recompute import drop_input_grads
    base = make_model(300)
    own = type("OwnCausalLM", (type(base),), {"__module__": "transformers_modules.own.modeling_own"})
    model = own(base.config)
    model.enable_input_require_grads()
    drop_input_grads(model)
    assert model.get_input_embeddings()._forward_hooks
    base.enable_input_require_grads()
    drop_input_grads(base)
    assert not base.get_input_embeddings()._forward_hooks


def test_reentrant_checkpointing_keeps_the_hook():
    """Layers checkpointed reentrant (a user's own switch) give their adapters no gradient unless the input needs
    one: there the hook stays; the switch slimtune turns on (use_reentrant=False) takes it off."""
    from slimtune.engine.recompute import drop_input_grads
    model = make_model(300)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    drop_input_grads(model)
    assert model.get_input_embeddings()._forward_hooks
    assert enable_checkpointing(model, CFG.method, log=lambda _: None)
    assert not model.get_input_embeddings()._forward_hooks
