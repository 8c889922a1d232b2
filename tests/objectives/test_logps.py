"""Answer log-probabilities computed a chunk of rows at a time equal the plain computation (all logits at once),
values and gradients, over odd shapes; through a model, they equal log_softmax of the model's own logits."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from pairs_fixture import random_pairs
from slimtune.engine.pair_logps import Item, collate_pairs, sequence_logps
from slimtune.objectives.logps import plain_token_logps, sequence_sums, token_logps

# fp32: the chunked and plain paths do the same matmuls on the same rows; only the order of the per-sequence
# sums can differ, a few ulps of values near 10
TOL = 1e-5


@pytest.mark.parametrize("n,hidden,vocab,rows",
                         [(7, 5, 97, 3), (123, 16, 431, 16), (431, 64, 123, 100), (5, 8, 31, 64)])
def test_chunked_token_logps_equal_plain(n, hidden, vocab, rows):
    g = torch.Generator().manual_seed(n)
    h = torch.randn(n, hidden, generator=g, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, requires_grad=True)
    b = torch.randn(vocab, generator=g, requires_grad=True)
    t = torch.randint(0, vocab, (n,), generator=g)
    seq = torch.randint(0, 4, (n,), generator=g)
    weights = torch.randn(4, generator=g)
    grads = []
    for fn in (lambda: token_logps(h, w, b, t, rows=rows), lambda: plain_token_logps(h, w, b, t)):
        out = fn()
        (sequence_sums(out, seq, 4) * weights).sum().backward()
        grads.append((out.detach().clone(), h.grad.clone(), w.grad.clone(), b.grad.clone()))
        h.grad = w.grad = b.grad = None
    for chunked, plain in zip(*grads):
        assert (chunked - plain).abs().max() <= TOL


def test_sequence_logps_equal_the_models_own_logits():
    model = make_model(400, seed=3).float()
    items = [Item(p, i) for i, p in enumerate(random_pairs(5, seed=1))]
    batch = collate_pairs(items, pad=0, device="cpu")
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch, chunked=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logsm = torch.log_softmax(logits[:, :-1], dim=-1)
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    want = (logsm.gather(2, labels.clamp(min=0)[..., None]).squeeze(2) * mask).sum(1)
    assert counts.tolist() == mask.sum(1).tolist()
    assert counts.tolist() == [len(i.pair.chosen) for i in items] + [len(i.pair.rejected) for i in items]
    assert (logps - want).abs().max() <= TOL
