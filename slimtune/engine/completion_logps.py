"""GRPO's completion log-probabilities without the logits of every completion token at once.

The decoder runs on prompt + completion; the output head then runs on the completion positions' hidden states a
chunk at a time (objectives/logps.token_logps: each chunk's fp32 logits exist alone, backward recomputes them),
at the sampling temperature (logits / T = the head applied to hidden / T, a bias divided by T too). All rows x
completion tokens x vocabulary fp32 logits, their log-softmax and its gradient (64 completions of 256 tokens at a
128k vocabulary: 25 GB) are never held. A model whose head post-processes logits (soft-capping, a logit scale) or a
prompt method runs its own forward with all logits, as before. Under FSDP2 the computation runs as the root
module's forward (engine/loss.as_root_forward), so the root's gathered parameters are there."""
from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from ..kernels import linear_ce
from ..objectives.logps import token_logps
from .loss import as_root_forward, model_inputs, sharded, split_head


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float,
                     chunked: bool = True) -> torch.Tensor:
    """log p(token) of every completion token [rows, completion tokens], at the sampling temperature as TRL
    takes them; positions follow the attention mask, as generation gave them."""
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
    if parts is None or not linear_ce.fits(parts[1]):
        logits = forward(**inputs, **keep_only(model, keep)).logits
        logits = logits[:, -keep:-1].float() / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    decoder, head = parts
    hidden = decoder(**model_inputs(inputs, decoder)).last_hidden_state[:, -keep:-1]
    bias = head.bias / temperature if head.bias is not None else None
    flat = hidden.reshape(-1, hidden.shape[-1]) / temperature
    return token_logps(flat, head.weight, bias, targets.reshape(-1)).reshape(targets.shape)


def keep_only(model: torch.nn.Module, n: int) -> dict[str, int]:
    """transformers' logits_to_keep where the model's forward takes it: the fp32 logits of a long prompt's
    positions (vocab x prompt tokens per row) are never computed."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": n} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}
