"""The training loss runs the model without a KV cache (the attention sees no past_key_values, named cache since
transformers 5.2x): a transformers forward with use_cache left on builds
every layer's keys and values into a cache that no loss reads (memory held to the end of the forward; under
compiled layers, each layer's cache entry a new graph: 8 recompiles at 1B on an H200, 2026-12-03)."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from slimtune import config, methods
from slimtune.data import pack
from slimtune.data.collate import collate
from slimtune.data.encode import IGNORE, Encoded
from slimtune.engine.loss import token_loss_sum


def _records():
    return [Encoded(list(range(3, 3 + n)), [IGNORE] * 3 + list(range(6, 3 + n)), where=f"r{n}") for n in (9, 14)]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_no_layer_sees_a_cache_and_the_loss_is_the_cached_forwards(packed, chunked):
    model = methods.apply(make_model(64), config.MethodConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    seen = []
    hooks = [layer.self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append(kwargs.get("past_key_values", kwargs.get("cache"))), with_kwargs=True)
        for layer in model.get_base_model().model.layers]
    batch = pack.collate(_records()) if packed else collate(_records(), 0)
    s, n = token_loss_sum(model, batch, chunked)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and all(c is None for c in seen), seen
    if packed:  # the model's own forward would attend across the packed records (kernels/attention.py is off)
        return
    # the same loss as the model's own forward with its cache on (the cache changes no number)
    inputs = {k: v for k, v in batch.items() if k != "labels" and not k.startswith("_")}
    logits = model(**inputs, use_cache=True).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    want = torch.nn.functional.cross_entropy(logits[labels != IGNORE].float(), labels[labels != IGNORE],
                                             reduction="sum")
    assert int(n) == int((labels != IGNORE).sum())
    torch.testing.assert_close(s.detach(), want.detach(), rtol=1e-5, atol=1e-5)
