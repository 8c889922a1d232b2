"""Padding-free rows: several records concatenated into one row, and the bin packer that fills rows.

A packed row carries no attention_mask. Instead position_ids restart at 0 for every record and
cu_seq_lens_q/k (int32, [0, len1, len1+len2, ...]) with max_length_q/k mark where records begin, which
is what variable-length attention (kernels/attention.py) needs to keep every record to itself; BOUNDS holds
the same offsets as Python ints, for the plain-PyTorch attention, which slices per record (reading them from
the device tensor would wait for the GPU in every layer).
The first label of every record is -100: the loss at position t predicts labels[t+1], so without that
the last token of record k would be trained to predict the first token of record k+1. In an unpacked
row the first token is never a target either, so the trained tokens, and each one's loss, are the same.
"""
from __future__ import annotations

import bisect
import random

import torch

from .encode import IGNORE, Encoded

BOUNDS = "seq_bounds"  # a packed row's record offsets on the host (tuple of ints)


def collate(records: list[Encoded]) -> dict:
    """One row (batch dim 1) of the records back to back, with the keys varlen attention reads."""
    ids, labels, positions, bounds = [], [], [], [0]
    for r in records:
        n = len(r.input_ids)
        ids += r.input_ids
        labels += ([IGNORE] + list(r.labels[1:])) if n else []
        positions += range(n)
        bounds.append(bounds[-1] + n)
    cu = torch.tensor(bounds, dtype=torch.int32)
    longest = max((b - a for a, b in zip(bounds, bounds[1:])), default=0)
    return {"input_ids": torch.tensor([ids], dtype=torch.long), "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([positions], dtype=torch.long),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
            BOUNDS: tuple(bounds)}


def tokens(batch: dict) -> int:
    """Real (non-pad) tokens in a batch, packed or padded."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def bins(lengths: list[int], budget: int, seed: int) -> list[list[int]]:
    """Record indices in groups of at most `budget` tokens each: every index exactly once, the groups
    nearly full (best-fit decreasing) and in a seeded random order.

    Records of equal length are taken in a seeded shuffle, so each epoch (seed + epoch) groups them
    differently; the groups are shuffled so that long and short records are not trained on in sequence.
    """
    too_long = [i for i, n in enumerate(lengths) if n > budget]
    if too_long:
        raise ValueError(f"records {too_long[:5]} are longer ({lengths[too_long[0]]} tokens) than a packed "
                         f"row holds ({budget}); the row budget must be at least data.max_len")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order
    smallest = min(lengths, default=0)
    groups: list[list[int]] = []
    rooms: list[tuple[int, int]] = []  # (tokens left, group), sorted: the tightest fit is a bisect away
    for i in order:
        k = bisect.bisect_left(rooms, (lengths[i], -1))
        if k == len(rooms):
            room, g = budget, len(groups)
            groups.append([])
        else:
            room, g = rooms.pop(k)
        groups[g].append(i)
        room -= lengths[i]
        if room >= max(smallest, 1):  # a group nothing fits into any more leaves the search
            bisect.insort(rooms, (room, g))
    rng.shuffle(groups)
    return groups


def fill(lengths: list[int], groups: list[list[int]], budget: int) -> float:
    """Share of the rows' token budget that records fill (1.0 = no room left anywhere)."""
    return sum(lengths[i] for g in groups for i in g) / max(1, len(groups) * budget)
