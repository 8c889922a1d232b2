"""engine/offload.py's reused host buffers under training as slimtune runs it: LoRA on every projection, layers
checkpointed as train.enable_checkpointing turns it on, fused LoRA layers then peft's after lora.disable, micro-
batches of changing length (the pool grows) and forwards that reuse it. Every saved tensor the hooks see goes
through the pool (min_bytes=1), the same buffers, views and copies as on a GPU; only copy_out / copy_back's
stream copies are plain copies here. Each LoRA gradient must equal the one without offload, bit for bit."""
from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import make_model
from slimtune import config, methods
from slimtune.engine import offload
from slimtune.engine.loop import accumulate, collate_micro
from slimtune.engine.offload import OffloadActivations
from slimtune.kernels import attention, lora
from slimtune.train import enable_checkpointing

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 300
# (rows, tokens) per micro-batch: the same twice (the pool reused as made), longer (grown), shorter (a view)
SHAPES = [(2, 40), (2, 40), (3, 70), (1, 20)]


def _lora_model(checkpointing: bool, base: torch.nn.Module | None = None) -> torch.nn.Module:
    model = make_model(VOCAB) if base is None else base
    method = config.MethodConfig(name="lora" if base is None else "qlora", r=4, alpha=8, dropout=0.0,
                                 target_modules=ALL)
    if checkpointing:
        assert enable_checkpointing(model, method, log=lambda *_: None)
    torch.manual_seed(1)
    model = methods.apply(model, method)
    for name, p in model.named_parameters():  # B starts at 0: give it values so A's gradient is not zero
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    model.train()  # as fit does: transformers checkpoints a layer only in training mode
    return model


def _grads(model: torch.nn.Module, ids: torch.Tensor, hooks: OffloadActivations | None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with hooks if hooks is not None else contextlib.nullcontext():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _passes(model: torch.nn.Module, hooks: OffloadActivations) -> list[tuple[int, list[int]]]:
    """Every pass's gradients with and without offload; (moved tensors, the pool's addresses) of each."""
    g, seen = torch.Generator().manual_seed(0), []
    assert lora.enable(model, log=lambda *_: None) == 14
    for shape in SHAPES + ["peft"] + SHAPES[:2]:
        if shape == "peft":  # peft's own layers from here, as tests/kernels/test_qlora.py's second pass
            lora.disable(model)
            continue
        ids = torch.randint(0, VOCAB, shape, generator=g)
        want, got = _grads(model, ids, None), _grads(model, ids, hooks)
        assert want.keys() == got.keys() and len(got) == 28
        for name in want:
            assert float(want[name].abs().max()) > 0, name
            assert torch.equal(got[name], want[name]), (shape, name, float((got[name] - want[name]).abs().max()))
        seen.append((len(hooks.moved), [t.data_ptr() for t in hooks.pool]))
    return seen


@pytest.mark.parametrize("checkpointing", [True, False])
def test_lora_gradients_with_offload_equal_without_over_passes_lengths_and_peft_layers(checkpointing):
    model = _lora_model(checkpointing)
    hooks = OffloadActivations(model, min_bytes=1, device_type="cpu")
    seen = _passes(model, hooks)
    moved = seen[0][0]
    # checkpointed: each layer's input, the final norm's and the loss's tensors; else every activation
    assert (moved < 12) if checkpointing else (moved > 40), moved
    assert all(n == moved and len(pool) == moved for n, pool in seen)  # one buffer per saved tensor
    assert seen[1][1] == seen[0][1]  # the second pass rewrote the first one's buffers
    assert seen[2][1] != seen[1][1]  # longer rows: grown


def test_two_forwards_before_one_backward_keep_their_own_buffers():
    """A buffer still held by a graph that has not run backward is not rewritten by the next forward: two
    micro-batches' losses summed, then one backward, give the gradients they give without offload."""
    model = _lora_model(checkpointing=True)
    hooks = OffloadActivations(model, min_bytes=1, device_type="cpu")
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, VOCAB, (2, 40), generator=g), torch.randint(0, VOCAB, (2, 40), generator=g)

    def both(offloaded: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        losses = []
        for ids in (a, b):
            with hooks if offloaded else contextlib.nullcontext():
                losses.append(model(input_ids=ids, labels=ids).loss)
        sum(losses).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    want, got = both(False), both(True)
    worst = max(float((got[k] - want[k]).abs().max()) for k in want)
    assert worst == 0.0, worst
    assert len(hooks.pool) == len(hooks.moved)  # the second forward's buffers replaced the lent ones ...
    _grads(model, a, hooks)
    kept = [t.data_ptr() for t in hooks.pool]
    _grads(model, a, hooks)
    assert [t.data_ptr() for t in hooks.pool] == kept  # ... and are reused once no graph holds them


def test_the_loop_s_micro_batches_reuse_the_buffers():
    """accumulate's backward frees each micro-batch's graph before the next forward: no new buffer per step."""
    model = _lora_model(checkpointing=True)
    hooks = OffloadActivations(model, min_bytes=1, device_type="cpu")
    g = torch.Generator().manual_seed(4)
    batches = [{"input_ids": (ids := torch.randint(0, VOCAB, (2, 30), generator=g)), "labels": ids.clone()}
               for _ in range(3)]
    accumulate(model, batches[:1], lambda: hooks)
    kept = [t.data_ptr() for t in hooks.pool]
    accumulate(model, batches, lambda: hooks)
    assert kept and [t.data_ptr() for t in hooks.pool] == kept


def test_copy_back_is_a_new_tensor_and_views_of_larger_storage_move_their_own_bytes():
    """The pool's buffer is never handed to autograd (the next forward rewrites it), and a contiguous view into
    a larger storage moves numel x element_size bytes, not the storage's."""
    hooks = OffloadActivations(min_bytes=1, device_type="cpu")
    base = torch.arange(1000, dtype=torch.float32)
    view = base[100:300].view(20, 10)
    with hooks:
        packed = hooks._pack(view)
        again = hooks._pack(view)  # saved twice: moved once
        view.mul_(2)
        changed = hooks._pack(view)  # modified in place since: moved again, into its own buffer
    assert again is packed and changed is not packed and len(hooks.pool) == 2
    assert hooks.moved == [((20, 10), 800), ((20, 10), 800)]
    back = hooks._unpack(packed)
    assert torch.equal(back, torch.arange(100, 300, dtype=torch.float32).view(20, 10))
    assert torch.equal(hooks._unpack(changed), back * 2)
    assert back.untyped_storage().data_ptr() != hooks.pool[0].untyped_storage().data_ptr()


def test_qlora_base_gradients_with_offload_equal_without(tiny_model_dir):
    """The same over a bitsandbytes 4-bit base as transformers loads it (bitsandbytes' CPU backend)."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes (the test extra) quantizes the 4-bit base")
    from transformers import BitsAndBytesConfig

    from slimtune import models

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base, tok = models.load(str(tiny_model_dir), "fp32", device="cpu", quantization=quant)
    model = _lora_model(checkpointing=True, base=base)
    attention.enable(model)  # packed rows attend within their records, as train runs them
    hooks = OffloadActivations(model, min_bytes=1, device_type="cpu")
    g = torch.Generator().manual_seed(2)
    records = [offload_record(len(tok), n, g) for n in (90, 61, 33)]
    batch = collate_micro(records, True, 0, "cpu")  # packed rows, as train takes them
    assert lora.enable(model, log=lambda *_: None) == 14
    for peft in (False, False, True):
        if peft:
            lora.disable(model)
        model.zero_grad(set_to_none=True)
        accumulate(model, [batch], contextlib.nullcontext, chunked=True)
        want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        accumulate(model, [batch], lambda: hooks, chunked=True)
        assert len(hooks.moved) > 0 and len(want) == 28
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert float(want[name].abs().max()) > 0 and torch.equal(p.grad, want[name]), name


def offload_record(vocab: int, n: int, g: torch.Generator):
    from slimtune.data.encode import Encoded

    return Encoded(torch.randint(0, vocab, (n,), generator=g).tolist(),
                   [-100] * 5 + torch.randint(0, vocab, (n - 5,), generator=g).tolist())


def test_cuda_stream_copies_are_what_copy_out_and_copy_back_do(monkeypatch):
    """copy_out / copy_back on a CUDA tensor, with the stream calls recorded (no GPU here): the side stream waits
    for the current one before the copy, an event after it, record_stream on the source, and the copy back waits
    for that event and returns a new tensor."""
    calls = []

    class Stream:
        def wait_stream(self, other): calls.append(("side waits for", other))

    class Event:
        def record(self, stream): calls.append(("event recorded on", stream))

    side = Stream()

    class Current:
        def wait_event(self, event): calls.append(("current waits for", event))
    current = Current()
    monkeypatch.setattr(offload, "_side_stream", lambda device: side)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: calls.append(("on", s)) or contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Event)

    class Fake(torch.Tensor):  # a CPU tensor that says it is on CUDA, for copy_out's branch
        @property
        def device(self):
            return torch.device("cuda", 0)

        def record_stream(self, stream):
            calls.append(("record_stream", stream))
    t = torch.arange(12.0).view(3, 4).as_subclass(Fake)
    host = torch.empty(3, 4)
    done = offload.copy_out(t, host)
    assert isinstance(done, Event) and torch.equal(host, torch.arange(12.0).view(3, 4))
    assert calls == [("side waits for", current), ("on", side), ("event recorded on", side), ("record_stream", side)]
    calls.clear()
    back = offload.copy_back(host, torch.device("cpu"), done)
    assert calls == [("current waits for", done)] and torch.equal(back, host)
    assert back.data_ptr() != host.data_ptr()
    calls.clear()  # copy_ahead: after the compute stream's queued work, on the side stream, an event after it
    monkeypatch.setattr(torch, "empty_like", lambda h, device=None: torch.zeros_like(h).as_subclass(Fake))
    ahead, ready = offload.copy_ahead(host, torch.device("cuda", 0))
    assert isinstance(ready, Event) and torch.equal(ahead, host) and ahead.data_ptr() != host.data_ptr()
    assert calls == [("side waits for", current), ("on", side), ("event recorded on", side), ("record_stream", side)]
