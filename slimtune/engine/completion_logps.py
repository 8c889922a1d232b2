"""GRPO's completion log-probabilities without the logits of every completion token at once.

The decoder runs on prompt + completion; the output head then runs on the completion positions' hidden states a
chunk at a time (objectives/logps.token_logps: each chunk's fp32 logits exist alone, backward recomputes them),
at the sampling temperature (logits / T = the head applied to hidden / T, a bias divided by T too). All rows x
completion tokens x vocabulary fp32 logits, their log-softmax and its gradient (64 completions of 256 tokens at a
128k vocabulary: 25 GB) are never held (objectives/logps.head_logps; an adapted or quantized head runs its own
forward on those positions). A model whose head post-processes logits (soft-capping, a logit scale) or a prompt
method runs its own forward with all logits, as before. Under FSDP2 the computation runs as the root
module's forward (engine/loss.as_root_forward), so the root's gathered parameters are there.

Packed (the run's packing is on: CUDA with varlen attention, or train.packing=rows), every row's real tokens (its
prompt where prompt_mask is 1, then its completion where completion_mask is 1) go back to back in one row with the
keys varlen attention reads (data/pack.collate's), position ids restarting per row as the padded forward numbers
them: no row costs the longest prompt + max_new_tokens. The head runs on the hidden states at the positions that
predict a completion token, and the log-probabilities go back to [rows, completion tokens] (0 past a row's stop,
where the loss's mask is 0)."""
from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable

import torch

from ..data.pack import BOUNDS
from ..objectives.logps import head_logps
from .loss import as_root_forward, model_inputs, sharded, split_head


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float,
                     chunked: bool = True, packed: bool = False) -> torch.Tensor:
    """log p(token) of every completion token [rows, completion tokens], at the sampling temperature as TRL
    takes them; positions follow the attention mask, as generation gave them. packed: one packed row (the model's
    attention switched to kernels/attention.py's), 0 at the positions completion_mask leaves out."""
    if packed:
        inputs, predicts = pack_rows(batch)
        mask = batch["completion_mask"].bool()
        targets = batch["completion_ids"][mask]
        if sharded(model):
            return as_root_forward(model, lambda b, fwd: _packed(model, b, predicts, targets, mask, temperature,
                                                                 chunked, fwd), inputs)
        return _packed(model, inputs, predicts, targets, mask, temperature, chunked, model)
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(dim=1) - 1).clamp(min=0)}
    targets = batch["completion_ids"]
    if sharded(model):
        return as_root_forward(model, lambda b, fwd: _logps(model, b, targets, temperature, chunked, fwd), inputs)
    return _logps(model, inputs, targets, temperature, chunked, model)


def _logps(model: torch.nn.Module, inputs: dict, targets: torch.Tensor, temperature: float, chunked: bool,
           forward: Callable) -> torch.Tensor:
    keep = targets.shape[1] + 1  # the positions whose next token is a completion token, and the last
    parts = split_head(model) if chunked else None
    if parts is None:
        logits = forward(**inputs, **keep_only(model, keep)).logits
        logits = logits[:, -keep:-1].float() / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    decoder, head = parts
    hidden = decoder(**model_inputs(inputs, decoder)).last_hidden_state[:, -keep:-1]
    flat = hidden.reshape(-1, hidden.shape[-1])
    return head_logps(flat, head, targets.reshape(-1), temperature).reshape(targets.shape)


def pack_rows(batch: dict[str, torch.Tensor]) -> tuple[dict, torch.Tensor]:
    """(inputs, predicts) of the packed row: every row's prompt tokens (prompt_mask 1) then its completion tokens
    (completion_mask 1), and for each completion token (row by row) the packed position whose hidden state
    predicts it, the one before it (a prompt holds at least one token: sampling continues it)."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1).bool()
    place = mask.flatten().cumsum(0).view(mask.shape) - 1  # each real token's position in the packed row
    predicts = place[:, batch["prompt_ids"].shape[1]:][batch["completion_mask"].bool()] - 1
    lengths = mask.sum(dim=1).tolist()
    bounds = (0, *itertools.accumulate(lengths))
    cu = torch.tensor(bounds, dtype=torch.int32, device=ids.device)
    longest = max(lengths, default=0)
    inputs = {"input_ids": ids[mask][None], "position_ids": (mask.cumsum(dim=1) - 1)[mask][None],
              "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
              BOUNDS: bounds}
    return inputs, predicts


def _packed(model: torch.nn.Module, inputs: dict, predicts: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
            temperature: float, chunked: bool, forward: Callable) -> torch.Tensor:
    parts = split_head(model) if chunked else None
    if parts is None:  # a head that post-processes logits (or the plain reference): all positions' logits
        logits = forward(**model_inputs(inputs, model)).logits[0, predicts].float() / temperature
        per = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    else:
        decoder, head = parts
        hidden = decoder(**model_inputs(inputs, decoder)).last_hidden_state[0, predicts]
        per = head_logps(hidden, head, targets, temperature)
    return torch.zeros(mask.shape, dtype=per.dtype, device=per.device).masked_scatter(mask, per)


def keep_only(model: torch.nn.Module, n: int) -> dict[str, int]:
    """transformers' logits_to_keep where the model's forward takes it: the fp32 logits of a long prompt's
    positions (vocab x prompt tokens per row) are never computed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
