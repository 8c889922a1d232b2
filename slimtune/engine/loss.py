"""Next-token loss over answer tokens only, without the vocabulary logits of prompt and pad positions.

The output head runs only on positions whose next token is trained: on the demo data that is about
60% of positions, and the head (49,152 x 576 on SmolLM2) is a large share of a CPU step.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..data.collate import TRAINED, collate
from ..data.encode import IGNORE, Encoded
from ..kernels import linear_ce
from ..runs.metrics_log import progress


def split_head(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(decoder, output head) of a causal LM, through a peft wrapper; None where that is unsafe."""
    inner = model
    if hasattr(model, "get_base_model"):
        if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
            return None  # prompt methods prepend virtual tokens in the wrapper's own forward
        inner = model.get_base_model()
    cfg = getattr(inner, "config", None)
    if cfg is None or getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None):
        return None  # heads that post-process logits need the model's own forward
    decoder = getattr(inner, getattr(inner, "base_model_prefix", ""), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if decoder is None or head is None:
        return None
    return decoder, head


def model_inputs(batch: dict, model: torch.nn.Module | None = None) -> dict:
    """What the model takes from a batch: all but labels and TRAINED. Packed rows (data/pack.py) bring
    position_ids, cu_seq_lens_q/k and max_length_q/k in place of attention_mask. A transformers model (one
    whose config has use_cache) also gets use_cache=False: its forward would otherwise build a KV cache of
    every layer's keys and values that a loss never reads (memory: 2 GiB at 8B and 16k tokens; and under
    compiled layers each layer's cache entry is a new graph)."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", TRAINED)}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False
    return inputs


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   chunked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over trained positions, their count) for one batch, both device
    tensors that nothing has read (training counts its tokens on the host and reads once a step).
    chunked=True: head and loss a chunk of rows at a time (kernels/linear_ce.py), never all the logits."""
    if sharded(model):
        return as_root_forward(model, lambda b, forward: _loss_sum(model, b, chunked, forward), batch)
    return _loss_sum(model, batch, chunked, model)


def sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2 shards this module (its root's parameters are gathered only around its own forward)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, FSDPModule)


def as_root_forward(model: torch.nn.Module, compute: Callable[[dict, Callable[..., object]], Any], batch: dict) -> Any:
    """compute(batch, the model's own forward) run as the model's forward. FSDP2 gathers the root's parameters
    (embeddings, final norm, head) in hooks around that forward; a loss that calls decoder and head apart runs
    as it for the length of the call, so the hooks (gather before, reduce-scatter of their gradients after
    backward) still fire."""
    own = model.__dict__.get("forward")
    plain = model.forward
    model.forward = lambda b: compute(b, plain)
    try:
        return model(batch)
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def _loss_sum(model: torch.nn.Module, batch: dict, chunked: bool,
              forward: Callable[..., object]) -> tuple[torch.Tensor, torch.Tensor]:
    take, targets, count = _trained(batch)
    parts = split_head(model)
    if parts is None:
        logits = forward(**model_inputs(batch, model)).logits
        # prompt_tuning / p_tuning return logits for their virtual tokens first: keep the last L positions
        logits = take(logits[:, -batch["input_ids"].shape[1]:][:, :-1])
    else:
        decoder, head = parts
        hidden = decoder(**model_inputs(batch, decoder)).last_hidden_state
        rows = take(hidden[:, :-1])
        if chunked and linear_ce.fits(head):
            return linear_ce.linear_cross_entropy(rows, head.weight, targets, head.bias), count
        logits = head(rows)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return loss, count


def _trained(batch: dict) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, torch.Tensor]:
    """(rows of a (B, T-1, ...) tensor at trained positions, their targets, their count): by the host's
    index where the batch has one (TRAINED: nothing waits for the device), else by a boolean mask, whose
    length the device must report first."""
    labels = batch["labels"][:, 1:]
    index = batch.get(TRAINED)
    if index is None:
        keep = labels != IGNORE
        return (lambda t: t[keep]), labels[keep], keep.sum()
    # the rows a boolean mask takes, in its order: the same values and gradients (no index repeats), and
    # no copy of the whole sliced tensor (logits can be GiBs)
    rows, positions = index[0], index[1]
    return (lambda t: t[rows, positions]), labels[rows, positions], torch.tensor(positions.numel())


@torch.no_grad()
def eval_loss(model: torch.nn.Module, records: list[Encoded], pad: int, batch_size: int = 8, device: str = "cpu",
              context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext, chunked: bool = False,
              show_progress: bool = False) -> dict:
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
            count += int(n)
            bar.update(len(batch["input_ids"]))
    model.train(was_training)
    loss = total / max(count, 1)
    return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), "eval_tokens": count}
