"""Chunked linear + cross-entropy against the plain-PyTorch reference: loss and every gradient."""
import pytest
import torch

from slimtune.kernels import linear_ce, reference
from slimtune.kernels.linear_ce import linear_cross_entropy


def _inputs(n, h, v, bias, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 2).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g) * 0.1).to(dtype).requires_grad_() if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, b, targets


def _grads(fn, hidden, weight, b, targets, scale=1.0, **kw):
    for t in (hidden, weight, b):
        if t is not None:
            t.grad = None
    loss = fn(hidden, weight, targets, b, **kw)
    (loss * scale).backward()
    return loss.detach(), [t.grad.clone() for t in (hidden, weight, b) if t is not None]


@pytest.mark.parametrize("n,h,v,rows", [(7, 16, 123, 3), (123, 64, 431, 16), (431, 33, 7, 100), (5, 8, 50, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference_fp32(n, h, v, rows, bias):
    args = _inputs(n, h, v, bias)
    ref_loss, ref_grads = _grads(reference.linear_cross_entropy, *args, scale=0.37)
    loss, grads = _grads(linear_cross_entropy, *args, scale=0.37, rows=rows)
    # fp32 throughout; the sums run in another order (chunks), hence relative 1e-5 and not bit equality
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        # a weight gradient sums n rows: its small entries carry the rounding of its large ones
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * max(1.0, want.abs().max().item()))


def test_frozen_weight_gets_no_gradient_and_hidden_does():
    hidden, weight, _, targets = _inputs(40, 16, 97, False)
    weight.requires_grad_(False)
    loss = linear_cross_entropy(hidden, weight, targets, rows=7)
    loss.backward()
    assert weight.grad is None
    ref = hidden.detach().clone().requires_grad_()
    reference.linear_cross_entropy(ref, weight, targets).backward()
    torch.testing.assert_close(hidden.grad, ref.grad, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_matches_plain_autocast():
    hidden, weight, _, targets = _inputs(123, 64, 431, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_loss, ref_grads = _grads(reference.linear_cross_entropy, hidden, weight, None, targets)
        loss, grads = _grads(linear_cross_entropy, hidden, weight, None, targets, rows=10)
    # both multiply in bf16 (8 bits of mantissa) and take softmax in fp32; the loss agrees to fp32
    # rounding of the same bf16 logits, the gradients to bf16 rounding (2^-8 relative)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def test_no_grad_and_empty():
    hidden, weight, _, targets = _inputs(9, 8, 20, False)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, rows=4)
        torch.testing.assert_close(loss, reference.linear_cross_entropy(hidden, weight, targets))
    empty = linear_cross_entropy(hidden[:0], weight, targets[:0])
    assert empty.item() == 0.0
    empty.backward()


def test_no_grad_computes_the_loss_alone(monkeypatch):
    """Evaluation: under no_grad no gradient buffers are built (autograd would still report needs_input_grad,
    and a vocab x hidden fp32 weight gradient is 1 GiB at a 1B Llama)."""
    from slimtune.kernels import linear_ce

    hidden, weight, _, targets = _inputs(9, 8, 20, False)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)

    def refuse(*a):
        raise AssertionError("the autograd Function ran under no_grad")

    monkeypatch.setattr(linear_ce._LinearCrossEntropy, "apply", refuse)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, rows=4)
    torch.testing.assert_close(loss, reference.linear_cross_entropy(hidden.detach(), weight.detach(), targets))


def test_chunks_shrink_where_free_memory_is_short(monkeypatch):
    """CHUNK_BYTES of logits (261 rows at a 128,256 vocabulary) unless an eighth of the free memory is less."""
    assert linear_ce.sized_rows(128256, torch.device("cpu")) == 261 == linear_ce.chunk_rows(128256)
    monkeypatch.setattr(linear_ce, "free_bytes", lambda device: 8 * 64 * 4 * 1000)
    assert linear_ce.sized_rows(1000, torch.device("cuda")) == 64
    monkeypatch.setattr(linear_ce, "free_bytes", lambda device: 80 * 2**30)
    assert linear_ce.sized_rows(128256, torch.device("cuda")) == 261  # never larger than CHUNK_BYTES
    monkeypatch.setattr(linear_ce, "free_bytes", lambda device: 0)
    assert linear_ce.sized_rows(128256, torch.device("cuda")) == 16  # the floor
