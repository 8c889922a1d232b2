"""The stream of micro-batches a run trains on: every epoch a seeded shuffle (or seeded bins of packed
records), its position saved in checkpoints; this rank's share of each micro-batch, collated on the device,
and the fingerprint a resume checks the data against."""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from array import array
from typing import TYPE_CHECKING

import torch

from . import pack
from .collate import TRAINED, collate, trained_index
from .encode import IGNORE, Encoded
from .readers import DataError

if TYPE_CHECKING:
    from ..config import TrainConfig


class MicroBatches:
    """Endless micro-batches: every epoch a new seeded shuffle, every record once per epoch. Its position
    (epoch, that epoch's order, index within it) goes into checkpoints, so a resumed run reads on from
    the very record where the saved one stopped. With a token budget (packing) a micro-batch is a bin of
    records holding at most `budget` tokens (data/pack.bins, seeded per epoch) instead of `size` records,
    and the epoch's order is its list of bins. rows=True keeps `size` records per micro-batch (the unpacked
    order) and only packs each into one row (train.packing=rows)."""

    def __init__(self, records: list[Encoded], size: int, seed: int, budget: int = 0, rows: bool = False):
        self.records, self.size, self.seed, self.budget = records, size, seed, budget
        self.rows = rows and budget <= 0
        self.epoch, self.index, self.order = 0, 0, self._shuffle(0)

    @property
    def binned(self) -> bool:
        return self.budget > 0

    @property
    def packed(self) -> bool:
        """Each micro-batch is collated as one packed row (data/pack.collate)."""
        return self.binned or self.rows

    def per_epoch(self) -> int:
        """Micro-batches in an epoch (packed: in the first epoch; later ones differ by a bin or so)."""
        return len(self.order) if self.binned else math.ceil(len(self.records) / self.size)

    def _shuffle(self, epoch: int) -> list:
        if self.binned:
            return pack.bins([len(r.input_ids) for r in self.records], self.budget, self.seed + epoch)
        order = list(range(len(self.records)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def __iter__(self):
        return self

    def __next__(self) -> list[Encoded]:
        if self.index >= len(self.order):
            self.epoch, self.index = self.epoch + 1, 0
            self.order = self._shuffle(self.epoch)
        if self.binned:
            batch = [self.records[j] for j in self.order[self.index]]
            self.index += 1
        else:
            batch = [self.records[j] for j in self.order[self.index:self.index + self.size]]
            self.index += self.size
        return batch

    def state_dict(self) -> dict:
        order = [list(b) for b in self.order] if self.binned else list(self.order)
        return {"epoch": self.epoch, "index": self.index, "order": order}

    def load_state_dict(self, state: dict) -> None:
        order = state["order"]
        packed = bool(order) and isinstance(order[0], list)
        if packed != self.binned:
            was, now = ("in bins", "by records") if packed else ("by records", "in bins")
            raise DataError(f"the checkpoint's micro-batches were made {was} and this run's {now}: resume with the "
                            "same train.packing on the same kind of device (train.packing=auto packs in bins on "
                            "CUDA only; rows and off both take micro_batch_size records)")
        flat = [j for b in order for j in b] if packed else order
        if sorted(flat) != list(range(len(self.records))):
            raise DataError(f"the checkpoint's data order covers {len(flat)} records, the data now "
                            f"{len(self.records)}: resume with the data it was trained on")
        self.epoch, self.index = state["epoch"], state["index"]
        self.order = [list(b) for b in order] if packed else list(order)


def micro_batches(records: list[Encoded], tc: TrainConfig, max_len: int, packing: str) -> MicroBatches:
    """The stream train.* asks for; packing as enable_kernels reports it (bins | rows | off)."""
    budget = tc.micro_batch_size * max_len if packing == "bins" else 0
    return MicroBatches(records, tc.micro_batch_size, tc.seed, budget,
                        rows=packing == "rows")


def total_steps(n_records: int, cfg_train: TrainConfig, micro_per_epoch: int = 0) -> int:
    """max_steps, else epochs x optimizer steps per epoch (micro_per_epoch: packed bins per epoch)."""
    if cfg_train.max_steps > 0:
        return cfg_train.max_steps
    micro = micro_per_epoch or math.ceil(n_records / cfg_train.micro_batch_size)
    per_epoch = math.ceil(micro / cfg_train.grad_accum)
    return max(1, math.ceil(per_epoch * cfg_train.epochs))


def fingerprint(records: list[Encoded]) -> dict:
    """What a resume checks: the encoded training data are the ones the checkpoint was trained on."""
    h = hashlib.sha256()
    for r in records:
        h.update(array("q", r.input_ids).tobytes() + b"|" + array("q", r.labels).tobytes() + b"\n")
    return {"records": len(records), "sha256": h.hexdigest()}


def split(sizes: list[int], parts: int) -> list[list[int]]:
    """Indices of `sizes` in `parts` groups of about equal total: longest first onto the lightest group
    (ties: the lower rank), so every rank does about the same work in each micro-batch."""
    groups: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        g = min(range(parts), key=lambda g: (load[g], g))
        groups[g].append(i)
        load[g] += sizes[i]
    return [sorted(g) for g in groups]


def share(records: list[Encoded], rank: int = 0, world: int = 1) -> list[Encoded]:
    """Rank `rank`'s part of a micro-batch over `world` processes (engine/distributed.rank() and size()),
    split by tokens (all of it in a single process). A rank left with no record still runs a forward
    (FSDP's collectives need every rank) on one whose labels are all masked, so it adds nothing to the loss
    or the gradients."""
    if world <= 1:
        return records
    groups = split([len(r.input_ids) for r in records], world)
    mine = [records[i] for i in groups[rank]]
    if mine:
        return mine
    idle = min(records, key=lambda r: len(r.input_ids))
    return [dataclasses.replace(idle, labels=[-100] * len(idle.labels), where=idle.where + " (idle rank)")]


def counts(records: list[Encoded], world: int = 1) -> tuple[int, int]:
    """(trained tokens, input tokens) of one micro-batch over all `world` ranks' shares, from the records on
    the host: the labels != -100 after each record's first position (what a collated row trains, padded or
    packed; records are already cut at data.max_len) and the tokens of every share (an idle rank's masked
    record included). Every rank holds the whole micro-batch, so each computes the same totals alone."""
    trained = sum(len(r.labels) - 1 - r.labels[1:].count(IGNORE) for r in records if r.labels)
    if world <= 1:
        return trained, sum(len(r.input_ids) for r in records)
    return trained, sum(len(r.input_ids) for k in range(world) for r in share(records, k, world))


def collate_micro(records: list[Encoded], packed: bool, pad: int, device: str) -> dict:
    """One micro-batch on the device: packed rows (data/pack.py) or right-padded ones. Packed rows'
    max_length_q/k stay Python ints (no device sync to read them). Rows of one length need no padding, so
    they go without attention_mask: transformers' SDPA mask would read the all-ones mask back (two device
    syncs a forward) only to drop it. TRAINED (data/collate.py) lets the loss take its rows without a sync."""
    batch = pack.collate(records) if packed else collate(records, pad)
    if not packed and len({len(r.input_ids) for r in records}) == 1:
        del batch["attention_mask"]
    batch[TRAINED] = trained_index(batch["labels"])
    # a blocking copy from pageable memory waits for all queued GPU work (PyTorch synchronizes the stream
    # after it); from pinned memory without blocking, the copy just joins the queue
    cuda = torch.device(device).type == "cuda"
    return {k: (v.pin_memory() if cuda else v).to(device, non_blocking=cuda) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}
