"""A micro-batch of preference records as one forward: chosen and rejected answers (KTO: the answer and its
mismatched partner) stacked as the rows of one right-padded batch, and each sequence's summed answer
log-probability read from the decoder's hidden states through the output head a chunk at a time
(objectives/logps.py), never all tokens x vocabulary logits at once.

Packed (the run's packing is on: CUDA with varlen attention, or train.packing=rows), the sequences go back to
back in one row instead (data/pack.collate: position ids restart per sequence, varlen attention keeps each to
itself) and SEQUENCE says which sequence each trained position belongs to, so no padding is computed; padded,
a pair's rows cost the difference in length between its two answers and every row the longest one's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..config import Config
from ..data import pack
from ..data.collate import TRAINED, collate, trained_index
from ..data.pairs import EncodedPair
from ..data.stream import split
from ..objectives.logps import head_logps, sequence_sums
from .loss import as_root_forward, model_inputs, sharded, split_head


@dataclass(frozen=True)
class Item:
    """A record as the stream holds it: the pair, its split ("train"/"eval") and index there (where a
    precomputed reference keeps its log-probabilities)."""
    pair: EncodedPair
    index: int
    split: str = "train"

    @property
    def where(self) -> str:
        return self.pair.where


SEQUENCE = "pair_sequence"  # a packed batch's key: the sequence (0..2B-1) of each trained position, on the device


def collate_pairs(items: list[Item], pad: int, device: str, packed: bool = False) -> dict:
    """Sequences 0..B-1 the chosen ones, B..2B-1 the rejected ones, with TRAINED on the device: right-padded
    rows, or (packed) one row of them back to back with SEQUENCE."""
    seqs = [i.pair.chosen_sequence() for i in items] + [i.pair.rejected_sequence() for i in items]
    batch = pack.collate(seqs) if packed else collate(seqs, pad)
    batch[TRAINED] = trained_index(batch["labels"])
    if packed:  # a trained position p predicts token p + 1, never a sequence's first (its label is -100)
        starts = torch.tensor(batch[pack.BOUNDS][1:-1], dtype=torch.long)
        batch[SEQUENCE] = torch.bucketize(batch[TRAINED][1] + 1, starts, right=True)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def input_tokens(items: list[Item]) -> int:
    """Tokens of both sequences of every record, padding excluded."""
    return sum(2 * len(i.pair.prompt) + len(i.pair.chosen) + len(i.pair.rejected) for i in items)


def answer_tokens(items: list[Item]) -> int:
    """Trained positions of both sequences: every answer token (the first position of a sequence has none)."""
    return sum(len(i.pair.chosen) + len(i.pair.rejected) - (not i.pair.prompt) * (bool(i.pair.chosen)
                                                                               + bool(i.pair.rejected))
               for i in items)


def pair_rows(cfg: Config, rows: list[tuple[int, int]] | None) -> list[tuple[int, int]] | None:
    """A preference objective's record (train.objective other than sft) is two rows of one forward, its chosen and
    rejected answers: its (width, trained tokens) as two rows of that width sharing its trained tokens. The
    reference pass runs without gradients, a layer's activations at a time, and keeps nothing."""
    if getattr(cfg.train, "objective", "sft") == "sft":
        return rows
    if rows is None:
        return [(cfg.data.max_len, cfg.data.max_len)] * (2 * cfg.train.micro_batch_size)
    return [row for n, t in rows for row in ((n, t - t // 2), (n, t // 2))]


def share(records: list[Item], rank: int, world: int) -> tuple[list[Item], bool]:
    """(rank `rank`'s records of a micro-batch over `world` processes, split by tokens as data/stream.share splits
    answers, whether they count): a rank left with none runs a forward on the shortest record (FSDP's collectives
    need every rank) whose loss counts for nothing."""
    if world <= 1:
        return records, True
    mine = [records[i] for i in split([input_tokens([r]) for r in records], world)[rank]]
    return (mine, True) if mine else ([min(records, key=lambda r: input_tokens([r]))], False)


def sequence_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   chunked: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer log-probability (2B,) in fp32, answer tokens (2B,)) of each row of `batch`. Under FSDP2 the
    computation runs as the root module's forward, whose hooks gather the embeddings, final norm and head that the
    decoder and head calls read (engine/loss.py does the same for the answers' loss)."""
    if sharded(model):
        return as_root_forward(model, lambda b, forward: _logps(model, b, chunked, forward), batch)
    return _logps(model, batch, chunked, model)


def _logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunked: bool,
           forward: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    rows, positions = batch[TRAINED][0], batch[TRAINED][1]
    targets = batch["labels"][:, 1:][rows, positions]
    seq = batch.get(SEQUENCE, rows)
    n = len(batch[pack.BOUNDS]) - 1 if SEQUENCE in batch else batch["input_ids"].shape[0]
    batch = {k: v for k, v in batch.items() if k != SEQUENCE}
    parts = split_head(model)
    if parts is None:  # a head that post-processes logits: the model's own forward, all logits
        logits = forward(**model_inputs(batch, model)).logits[:, -batch["input_ids"].shape[1]:][:, :-1]
        picked = logits[rows, positions].float()
        per = picked.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(picked, dim=-1)
    else:
        decoder, head = parts
        hidden = decoder(**model_inputs(batch, decoder)).last_hidden_state[:, :-1][rows, positions]
        per = head_logps(hidden, head, targets, chunked=chunked)
    return sequence_sums(per, seq, n), torch.bincount(seq, minlength=n)
