"""train.offload_activations (engine/offload.py): with checkpointed layers, the tensors autograd keeps outside
them are the layers' inputs, which the hooks move out and bring back with the same gradients. On the CPU a
copy stands in for the move to pinned memory; tests/engine/test_offload_gpu.py checks the real one."""
from __future__ import annotations

import torch

from conftest import make_model
from slimtune import config, methods
from slimtune.engine.offload import OffloadActivations

TOKENS = (2, 96)


def _model(checkpointing: bool):
    model = make_model(400)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    model = methods.apply(model, config.MethodConfig(name="lora", r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model.train()
    return model


def _grads(model, hooks=None) -> tuple[float, dict]:
    torch.manual_seed(0)
    ids = torch.randint(0, 400, TOKENS)
    if hooks is None:
        loss = model(input_ids=ids, labels=ids).loss
    else:
        with hooks:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpointed_layers_offload_exactly_their_inputs():
    model = _model(checkpointing=True)
    hidden = TOKENS[0] * TOKENS[1] * model.config.hidden_size * 4
    loss0, ref = _grads(model)
    model.zero_grad(set_to_none=True)
    hooks = OffloadActivations(model, min_bytes=hidden, device_type="cpu")
    loss1, got = _grads(model, hooks)
    # outside the checkpointed layers autograd keeps one hidden state per layer (its input) and the final
    # norm's input (saved twice, moved once); the rest is the head's log-softmax
    states = [n for shape, n in hooks.moved if shape == (*TOKENS, model.config.hidden_size)]
    assert states == [hidden] * (model.config.num_hidden_layers + 1)
    assert {shape for shape, _ in hooks.moved} == {(*TOKENS, model.config.hidden_size), (TOKENS[0] * TOKENS[1], 400)}
    assert loss1 == loss0
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    # backward reads them in reverse: each unpack started bringing back the one moved before it, so all but the
    # first read came back from a copy started early
    assert hooks.early == len(hooks.moved) - 1


def test_parameters_and_small_tensors_stay():
    model = _model(checkpointing=False)
    hooks = OffloadActivations(model, min_bytes=1, device_type="cpu")
    loss0, ref = _grads(model)
    model.zero_grad(set_to_none=True)
    loss1, got = _grads(model, hooks)
    assert loss1 == loss0 and all(torch.equal(ref[k], got[k]) for k in ref)
    weights = {tuple(p.shape) for p in model.parameters()}
    assert len(hooks.moved) > 20 and not weights & {shape for shape, _ in hooks.moved}  # activations only
    floor = OffloadActivations(model, min_bytes=TOKENS[0] * TOKENS[1] * 400 * 4 + 1, device_type="cpu")
    _grads(model, floor)
    assert floor.moved == []  # nothing is as large as the logits + 1 byte


def test_the_loop_trains_the_same_with_offload(tiny_model_dir, tmp_path):
    from conftest import lora_run_config
    from slimtune import train as train_mod
    from slimtune.runs.metrics_log import read_metrics

    losses = {}
    for offload in (False, True):
        cfg = config.load(lora_run_config(tmp_path, tiny_model_dir, f"run{offload}", max_steps=3,
                                          micro_batch_size=4, offload_activations=offload))
        train_mod.from_config(cfg, show_progress=False, log=lambda *a: None)
        losses[offload] = [r["loss"] for r in read_metrics(tmp_path / f"run{offload}" / "metrics.jsonl") if "loss" in r]
    assert len(losses[True]) == 3 and losses[True] == losses[False]


def test_host_buffers_are_made_once_for_the_longest_forward_and_reused():
    """engine/offload.py's pool: the i-th moved tensor of every forward reuses one buffer, first made for the
    longest forward the run can have (capped at HEADROOM x the request), so a longer row later makes none."""
    from slimtune.engine import offload

    hooks = offload.OffloadActivations(max_tokens=16 * 1024)
    hooks._next = 0
    first = hooks._buffer(2000 * 64 * 2, 2000)  # a row of 2,000 tokens, hidden 64, bf16
    assert first.numel() == 2000 * 64 * 2 and hooks.pool[0].numel() == 8000 * 64 * 2  # HEADROOM 4 < 16384 / 2000
    second = hooks._buffer(100, 1)
    assert len(hooks.pool) == 2
    hooks._next = 0  # the next forward: a row twice as long fits the same memory
    again = hooks._buffer(4000 * 64 * 2, 4000)
    assert again.data_ptr() == first.data_ptr() and len(hooks.pool) == 2
    hooks._next = 0  # past the headroom: grown 1.5x (or to the request), then reused
    big = hooks._buffer(10000 * 64 * 2, 10000)
    assert hooks.pool[0].numel() == 12000 * 64 * 2 and big.data_ptr() == hooks.pool[0].data_ptr()
    assert second.numel() == 100
    exact = offload.OffloadActivations(max_tokens=1024)  # a single long record fills max_tokens: no headroom
    exact._next = 0
    exact._buffer(1024 * 64 * 2, 1024)
    assert exact.pool[0].numel() == 1024 * 64 * 2


def test_checkpointing_skips_torch_s_per_tensor_metadata_check_with_the_same_gradients(monkeypatch):
    """engine/recompute.py turns checkpointing on with determinism_check="none": torch no longer builds and
    compares a metadata dict for every tensor the layers save (twice a step), host time on a CPU-paced GPU; the
    gradients are the same as with the check."""
    import torch.utils.checkpoint as ckpt

    from slimtune.engine import recompute

    assert recompute.KWARGS == {"use_reentrant": False, "determinism_check": "none"}  # what runs use
    calls = []
    default = ckpt._allowed_determinism_checks_to_fns["default"]
    monkeypatch.setitem(ckpt._allowed_determinism_checks_to_fns, "default",
                        lambda t: calls.append(1) or default(t))
    grads = {}
    for check in ("default", "none"):
        model = _model(checkpointing=False)
        monkeypatch.setattr(recompute, "KWARGS", {"use_reentrant": False, "determinism_check": check})
        assert recompute.enable_checkpointing(model, config.MethodConfig(name="lora"), log=lambda *_: None)
        calls.clear()
        grads[check] = _grads(model)
        assert (len(calls) > 0) is (check == "default")
    assert grads["none"][0] == grads["default"][0]
    assert all(torch.equal(grads["none"][1][k], grads["default"][1][k]) for k in grads["default"][1])
