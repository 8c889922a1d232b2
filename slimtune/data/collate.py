"""Batches of encoded records, right-padded; padding is masked by attention_mask and -100 labels."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .encode import IGNORE, Encoded

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A batch key: the (row, position) indices into labels[:, 1:] of the trained positions, found on the host,
# as a (2, N) tensor. The loss takes those rows by index; a boolean mask on the device would make the CPU
# wait for the forward to finish only to learn how many rows it takes.
TRAINED = "trained_index"


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The pad id: the tokenizer's pad token, else its EOS (safe: labels never come from token ids)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0  # pragma: no cover


def collate(records: list[Encoded], pad: int) -> dict[str, torch.Tensor]:
    """Right padding to the longest record in the batch."""
    width = max(len(r.input_ids) for r in records)
    ids = torch.full((len(records), width), pad, dtype=torch.long)
    labels = torch.full((len(records), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(records), width), dtype=torch.long)
    for i, r in enumerate(records):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        labels[i, :n] = torch.tensor(r.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def trained_index(labels: torch.Tensor) -> torch.Tensor:
    """TRAINED of a batch's labels on the host: positions whose next token is trained, row-major."""
    return (labels[:, 1:] != IGNORE).nonzero().T.contiguous()


def left_pad(prompts: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Left padding for generation, so every prompt ends where new tokens begin."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return {"input_ids": ids, "attention_mask": mask}
