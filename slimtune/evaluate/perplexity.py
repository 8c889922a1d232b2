"""Loss on answer tokens: summed cross-entropy over every trained token, divided by their count."""
from __future__ import annotations

import contextlib
import math

import torch

from ..data.collate import collate
from ..engine.log import progress
from ..engine.loss import token_loss_sum


@torch.no_grad()
def eval_loss(model, records, pad: int, batch_size: int = 8, device: str = "cpu",
              context=contextlib.nullcontext, chunked: bool = False, show_progress: bool = False) -> dict:
    """Mean loss per answer token over all records, and its perplexity. chunked: head + loss a chunk of rows
    at a time, as training's train.loss=chunked (the full-vocabulary logits of a batch would otherwise add
    several GiB to a run whose training never holds them). show_progress: a bar on stderr (records, time left)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(records)), key=lambda i: len(records[i].input_ids))  # less padding
    with progress(len(records), show_progress, desc="eval loss", unit="record") as bar:
        for i in range(0, len(order), batch_size):
            batch = collate([records[j] for j in order[i:i + batch_size]], pad)
            batch = {k: v.to(device) for k, v in batch.items()}
            with context():
                s, n = token_loss_sum(model, batch, chunked)
            total += s.item()
            count += n
            bar.update(len(batch["input_ids"]))
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}
