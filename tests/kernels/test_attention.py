"""Packed attention on the CPU: the per-record reference against a block-diagonal mask, packed vs unpacked
loss and every gradient (LoRA and full, Llama and Qwen2 shapes), record boundaries, and the switch."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from slimtune import config, methods
from slimtune.config import ConfigError, MethodConfig
from slimtune.data import pack
from slimtune.data.collate import collate, left_pad
from slimtune.data.encode import IGNORE, Encoded
from slimtune.engine.loop import accumulate
from slimtune.kernels.select import use_packing
from slimtune.engine.loss import split_head
from slimtune.kernels import attention, reference

VOCAB = 300
# fp32 on the CPU: packed and unpacked run the same matmuls on the same rows; attention differs only in
# summation order (one SDPA call per record vs one padded batch), which moves results by ~1e-7 here.
ATOL = RTOL = 1e-5


def _block_causal(lengths: list[int], window: int | None = None) -> torch.Tensor:
    """The (T, T) mask packed attention must equal: causal, within each record, optionally windowed."""
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i = torch.arange(len(seg))
    mask = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
    return mask & (i[:, None] - i[None, :] < window) if window else mask


@pytest.mark.parametrize("lengths, heads, kv_heads, window", [
    ([7], 4, 4, None), ([7, 123], 4, 2, None), ([123, 431, 7, 1], 6, 2, None), ([431, 7, 123], 4, 1, 50)])
def test_reference_equals_block_diagonal_sdpa_forward_and_gradients(lengths, heads, kv_heads, window):
    torch.manual_seed(0)
    t, d, scale = sum(lengths), 16, 0.3
    q = torch.randn(1, heads, t, d, requires_grad=True)
    k = torch.randn(1, kv_heads, t, d, requires_grad=True)
    v = torch.randn(1, kv_heads, t, d, requires_grad=True)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    out = reference.packed_attention(q, k, v, cu, scale=scale, window=window)
    g = heads // kv_heads
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                          attn_mask=_block_causal(lengths, window), scale=scale)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    for a, b in zip(got, torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)


def _records(lengths: list[int], seed: int = 0) -> list[Encoded]:
    rng = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rng.randrange(VOCAB) for _ in range(n)]
        prompt = rng.randint(1, n - 1)
        out.append(Encoded(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def _model(arch: str, method: str, **extra):
    model = make_model(VOCAB, arch=arch)
    for key, value in extra.items():
        setattr(model.config, key, value)
    if method == "lora":
        model = methods.apply(model, MethodConfig(name="lora", r=4, alpha=8, dropout=0.0,
                                                  target_modules=["all-linear"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero, which would leave every lora_A gradient zero
                torch.nn.init.normal_(p, std=0.2)
    else:
        methods.apply(model, MethodConfig(name="full"))
    model.train()
    return model


def _loss_and_grads(model, batches) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss, _ = accumulate(model, batches)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_packed_loss_and_gradients_equal_unpacked(arch, method):
    """Two micro-batches of an optimizer step, padded vs packed: the same mean loss and every gradient."""
    model = _model(arch, method)
    records = _records([7, 31, 2, 64, 13, 5, 40])
    parts = [records[:3], records[3:]]
    loss, grads = _loss_and_grads(model, [collate(rs, pad=0) for rs in parts])
    attention.enable(model)
    try:
        packed_loss, packed_grads = _loss_and_grads(model, [pack.collate(rs) for rs in parts])
    finally:
        attention.disable(model)
    assert packed_loss == pytest.approx(loss, rel=RTOL, abs=ATOL)
    assert grads.keys() == packed_grads.keys() and len(grads) > 0
    for name in grads:
        assert grads[name].abs().sum() > 0, name  # every trainable parameter takes part
        torch.testing.assert_close(packed_grads[name], grads[name], atol=ATOL, rtol=RTOL, msg=name)


def test_packed_equals_unpacked_with_a_sliding_window_shorter_than_records():
    """Qwen2 with a 6-token window on its second layer: the window applies per record."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("qwen2", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                               use_sliding_window=True, sliding_window=6, max_window_layers=1)
    model = AutoModelForCausalLM.from_config(cfg).train()
    assert [layer.self_attn.sliding_window for layer in model.model.layers] == [None, 6]
    records = _records([9, 20, 3, 15], seed=2)
    loss, grads = _loss_and_grads(model, [collate(records, pad=0)])
    attention.enable(model)
    packed_loss, packed_grads = _loss_and_grads(model, [pack.collate(records)])
    attention.disable(model)
    assert packed_loss == pytest.approx(loss, rel=RTOL, abs=ATOL)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], atol=ATOL, rtol=RTOL, msg=name)


def _hidden(model, batch) -> torch.Tensor:
    decoder, _ = split_head(model)
    with torch.no_grad():
        return decoder(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_no_record_sees_another(arch):
    model = _model(arch, "lora")
    attention.enable(model)
    records = _records([11, 17, 9], seed=1)
    base = _hidden(model, pack.collate(records))
    changed = [Encoded([(x + 1) % VOCAB for x in records[0].input_ids], records[0].labels)] + records[1:]
    other = _hidden(model, pack.collate(changed))
    assert not torch.equal(base[:11], other[:11])
    assert torch.equal(base[11:], other[11:])  # exact: records 2 and 3 never read record 1's tokens
    changed = records[:1] + [Encoded([(x + 7) % VOCAB for x in records[1].input_ids], records[1].labels)] + records[2:]
    other = _hidden(model, pack.collate(changed))
    assert torch.equal(base[:11], other[:11]) and torch.equal(base[28:], other[28:])
    alone = _hidden(model, pack.collate(records[1:2]))  # and each record is what it is on its own
    torch.testing.assert_close(base[11:28], alone, atol=ATOL, rtol=RTOL)
    # position_ids alone (no cu_seq_lens) are enough: the segments are read from where positions restart
    batch = {k: v for k, v in pack.collate(records).items() if not k.startswith(("cu_", "max_"))}
    torch.testing.assert_close(_hidden(model, batch), base, atol=0, rtol=0)
    attention.disable(model)


def test_padded_batches_and_generation_still_work_while_switched_on():
    """Eval (right padding) and generation (left padding, a KV cache) go through transformers' SDPA."""
    model = _model("llama", "lora").eval()
    records = _records([5, 12, 8], seed=3)
    prompts = [r.input_ids for r in records]
    with torch.no_grad():
        right = model(**{k: v for k, v in collate(records, 0).items() if k != "labels"}).logits
        left = model(**left_pad(prompts, 0)).logits
        generated = model.generate(**left_pad(prompts, 0), max_new_tokens=4, do_sample=False, pad_token_id=0)
        attention.enable(model)
        assert attention.enabled(model)
        torch.testing.assert_close(model(**{k: v for k, v in collate(records, 0).items() if k != "labels"}).logits,
                                   right, atol=0, rtol=0)
        torch.testing.assert_close(model(**left_pad(prompts, 0)).logits, left, atol=0, rtol=0)
        again = model.generate(**left_pad(prompts, 0), max_new_tokens=4, do_sample=False, pad_token_id=0)
    attention.disable(model)
    assert torch.equal(again, generated)
    assert not attention.enabled(model) and model.get_base_model().config._attn_implementation == "sdpa"


def test_which_models_and_settings_pack():
    llama = _model("llama", "lora")
    assert attention.unsupported(llama) is None
    assert use_packing("auto", llama, "cpu") is None  # the CPU keeps padded batches unless asked
    assert use_packing("auto", llama, "cuda") == "rows"
    assert use_packing("on", llama, "cpu") == "bins" and use_packing("off", llama, "cuda") is None
    assert use_packing("rows", llama, "cpu") == "rows"
    prompt = methods.apply(make_model(VOCAB), MethodConfig(name="prompt_tuning", num_virtual_tokens=4))
    assert "virtual tokens" in attention.unsupported(prompt)
    assert use_packing("auto", prompt, "cuda") is None
    with pytest.raises(ConfigError, match="train.packing=on: prompt_tuning prepends virtual tokens"):
        use_packing("on", prompt, "cuda")
    with pytest.raises(ConfigError, match="train.packing: on does not work with method.name=p_tuning"):
        config.load(overrides=["train.packing=on", "method.name=p_tuning"])
    with pytest.raises(ConfigError, match="train.packing: 'yes' is not one of auto, on, rows, off"):
        config.load(overrides=["train.packing=yes"])
    assert config.load(overrides=["method.name=prefix_tuning"]).train.packing == "auto"


def _fake_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
              window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch >= 2.12's varlen_attn contract, computed by the reference: (T, H, D) in and out."""
    assert query.dim() == 3 and cu_seq_q.dtype == torch.int32 and cu_seq_k is cu_seq_q
    assert isinstance(window_size, tuple) and window_size[1] == 0  # causal: a tuple, as varlen_attn compares
    assert enable_gqa == (key.shape[1] != query.shape[1])
    assert max_q == max_k == int((cu_seq_q[1:] - cu_seq_q[:-1]).max())
    window = window_size[0] + 1 if window_size[0] >= 0 else None
    out = reference.packed_attention(*(t.transpose(0, 1)[None].float() for t in (query, key, value)), cu_seq_q,
                                     scale, window=window)
    return out[0].transpose(0, 1).to(query.dtype)


def _fake_old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
    """The first varlen_attn (torch 2.10): is_causal, no scale, equal heads documented."""
    assert is_causal and key.shape[1] == query.shape[1]
    out = reference.packed_attention(*(t.transpose(0, 1)[None].float() for t in (query, key, value)), cu_seq_q)
    return out[0].transpose(0, 1).to(query.dtype)


@pytest.mark.parametrize("fake, kv_heads, window", [(_fake_new, 4, None), (_fake_new, 2, None), (_fake_new, 1, 9),
                                                    (_fake_old, 4, None), (_fake_old, 2, None)])
def test_varlen_call_fits_each_torch_signature(monkeypatch, fake, kv_heads, window):
    """The CUDA kernel can't run here: a stand-in with each release's signature checks how the call is
    built (layout, int32 offsets, causal flag, scale, GQA, window) and computes what the kernel should.
    (The first varlen_attn has no window: attention() keeps windowed layers on the reference there.)"""
    import inspect

    monkeypatch.setattr(attention, "_varlen_fn", lambda: fake)
    monkeypatch.setattr(attention, "_varlen_params", lambda: frozenset(inspect.signature(fake).parameters))
    torch.manual_seed(0)
    lengths, scale = [7, 31, 2, 20], 0.2
    q, k, v = (torch.randn(1, h, sum(lengths), 16, dtype=torch.bfloat16) for h in (4, kv_heads, kv_heads))
    cu = torch.tensor([0, 7, 38, 40, 60], dtype=torch.int32)
    out = attention.varlen(q, k, v, cu.long(), 31, scale, window)
    want = reference.packed_attention(q.float(), k.float(), v.float(), cu, scale, window=window).transpose(1, 2)
    assert out.shape == (1, 60, 4, 16) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)  # bf16 inputs and output: ~3 digits


def test_varlen_gives_gradients_back_as_views_of_the_kernels_own(monkeypatch):
    """Backward through the layout change is views only: the kernel's (T, H, D) gradient reaches q/k/v of the
    (1, H, T, D) layout as a transposed view of itself (Llama's q/k/v views then read it contiguous, without a
    copy), with no select backward writing it into a zero-filled tensor; values as the reference's."""
    import inspect

    grads = {}

    class Kernel(torch.autograd.Function):  # one opaque node, as the CUDA kernel is: (T, H, D) gradients out
        @staticmethod
        def forward(ctx, query, key, value, cu, longest, scale, window_size):
            ctx.inputs = [t.detach().requires_grad_() for t in (query, key, value)]
            with torch.enable_grad():
                ctx.out = _fake_new(*ctx.inputs, cu, cu, longest, longest, scale=scale, window_size=window_size,
                                    enable_gqa=key.shape[1] != query.shape[1])
            return ctx.out.detach()

        @staticmethod
        def backward(ctx, g):
            got = [t.contiguous() for t in torch.autograd.grad(ctx.out, ctx.inputs, g)]
            grads.update(zip("qkv", got))
            return *got, None, None, None, None

    def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
             window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
        return Kernel.apply(query, key, value, cu_seq_q, max_q, scale, window_size)

    monkeypatch.setattr(attention, "_varlen_fn", lambda: fake)
    monkeypatch.setattr(attention, "_varlen_params", lambda: frozenset(inspect.signature(_fake_new).parameters))
    torch.manual_seed(0)
    # as Llama makes them: projections (1, T, H * D) viewed as (1, T, H, D), transposed to (1, H, T, D)
    proj = [torch.randn(1, 60, h * 16, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2)]
    q, k, v = (p.view(1, 60, -1, 16).transpose(1, 2) for p in proj)
    cu = torch.tensor([0, 7, 38, 40, 60], dtype=torch.int32)
    out = attention.varlen(q, k, v, cu.long(), 31, 0.2)
    nodes, todo = set(), [out.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and type(node).__name__ not in nodes:
            nodes.add(type(node).__name__)
            todo += [n for n, _ in node.next_functions]
    assert "SelectBackward0" not in nodes
    out.float().square().sum().backward()
    for name, p in zip("qkv", proj):
        assert p.grad.data_ptr() == grads[name].data_ptr()  # the kernel's gradient itself: no copy on the way
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    reference.packed_attention(*ref, cu, 0.2).square().sum().backward()
    for p, r in zip(proj, ref):
        torch.testing.assert_close(p.grad.float(), r.grad.transpose(1, 2).reshape(p.shape), atol=0.1, rtol=3e-2)


def _fake_no_gqa_flag(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                      window_size=(-1, -1)):
    """A release between the two above: window_size, no enable_gqa; computes GQA from fewer kv heads (the
    reference reads each group's head), as FlashAttention-2's kernel does."""
    window = window_size[0] + 1 if window_size[0] >= 0 else None
    out = reference.packed_attention(*(t.transpose(0, 1)[None].float() for t in (query, key, value)), cu_seq_q,
                                     scale, window=window)
    return out[0].transpose(0, 1).to(query.dtype)


def _fake_first_head(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                     window_size=(-1, -1)):
    """A kernel that, given fewer kv heads, reads kv head 0 for every query head: wrong where the heads differ."""
    if key.shape[1] != query.shape[1]:
        key, value = (t[:, :1].expand(-1, query.shape[1], -1).contiguous() for t in (key, value))
    return _fake_no_gqa_flag(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, scale=scale,
                             window_size=window_size)


@pytest.mark.parametrize("fake, works", [(_fake_no_gqa_flag, True), (_fake_first_head, False), (_fake_old, False)])
def test_kernel_gqa_is_taken_only_where_it_gives_the_repeated_heads_answer(monkeypatch, fake, works):
    """Without enable_gqa, fewer kv heads go to the kernel as they are only once check_kernel_gqa found the output
    and gradients of repeated heads (a kernel that refuses them, or reads the wrong head, keeps the repeat); the
    packed attention's answer is the same either way."""
    import inspect

    monkeypatch.setattr(attention, "_varlen_fn", lambda: fake)
    monkeypatch.setattr(attention, "_varlen_params", lambda: frozenset(inspect.signature(fake).parameters))
    assert attention.check_kernel_gqa("cpu") is works
    monkeypatch.setattr(attention, "KERNEL_GQA", works)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 60, 16, dtype=torch.bfloat16) for h in (4, 2, 2))
    q2, k2, v2, _ = attention._varlen_kwargs(*(t[0].transpose(0, 1) for t in (q, k, v)), None, None)
    assert k2.shape[1] == v2.shape[1] == (2 if works else 4) and q2.shape[1] == 4
    cu = torch.tensor([0, 7, 38, 40, 60], dtype=torch.int32)
    out = attention.varlen(q, k, v, cu.long(), 31, 0.2)
    want = reference.packed_attention(q.float(), k.float(), v.float(), cu, 0.2).transpose(1, 2)
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)


def test_the_run_says_how_the_kernel_gets_grouped_key_value_heads(monkeypatch):
    """heads_note (the run's packing line): as they are where the kernel takes them (enable_gqa, or the check
    held), repeated where not; nothing for a model whose query heads each have their own."""
    model = make_model(64)  # 4 query heads, 2 key/value heads
    monkeypatch.setattr(attention, "_varlen_params", lambda: frozenset({"window_size"}))
    monkeypatch.setattr(attention, "KERNEL_GQA", True)
    assert attention.heads_note(model) == "; 2 key/value heads for 4 query heads, as they are"
    monkeypatch.setattr(attention, "KERNEL_GQA", False)
    assert attention.heads_note(model) == \
        "; 2 key/value heads repeated for 4 query heads (this kernel did not take them as they are)"
    monkeypatch.setattr(attention, "_varlen_params", lambda: frozenset({"window_size", "enable_gqa"}))
    assert attention.heads_note(model).endswith("as they are")
    model.config.num_key_value_heads = 4
    assert attention.heads_note(model) == ""


@pytest.mark.parametrize("one_record", ["varlen", "sdpa", "cudnn"])
def test_a_row_of_one_record_goes_where_one_record_says(monkeypatch, one_record):
    """attention.ONE_RECORD on the fast path (made to hold here on the CPU): a row of one record goes to SDPA (the
    unpacked forward's answer) unless it is "varlen"; a row of several records always goes to varlen."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, 9, 16) for h in (4, 2, 2))

    class Attn(torch.nn.Module):
        is_causal = True
        num_key_value_groups = 2

    calls = []
    monkeypatch.setattr(attention, "_fast", lambda *a: True)
    monkeypatch.setattr(attention, "varlen", lambda q, k, v, cu, *a: calls.append(cu.tolist()) or q.transpose(1, 2))
    monkeypatch.setattr(attention, "ONE_RECORD", one_record)
    one = torch.tensor([0, 9], dtype=torch.int32)
    out, _ = attention.attention(Attn(), q, k, v, None, scaling=0.3, cu_seq_lens_q=one, max_length_q=9)
    want = reference.packed_attention(q, k, v, one, 0.3).transpose(1, 2)
    if one_record == "varlen":
        assert calls == [[0, 9]]
    else:
        assert calls == [] and torch.allclose(out, want, atol=1e-5)
    two = torch.tensor([0, 4, 9], dtype=torch.int32)
    attention.attention(Attn(), q, k, v, None, scaling=0.3, cu_seq_lens_q=two, max_length_q=5)
    assert calls[-1] == [0, 4, 9]
