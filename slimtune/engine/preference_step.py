"""The training step of the preference objectives (train.objective dpo, ipo, simpo, orpo, kto).

`fit` takes a `PairObjective` and hands it each step's micro-batches: each goes through ONE forward with its
chosen and rejected answers as the rows of one batch (engine/pair_logps.py), the reference's log-probabilities
come without gradients (engine/reference.py), and the loss and its metrics from objectives/. The micro-batch
losses are weighted by their share of the step's records, so grad_accum x micro_batch_size gives the gradient
of the mean over the step's records."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from array import array
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .. import objectives
from ..config import Config, ConfigError, TrainConfig
from ..config.fields import PreferenceConfig
from ..data.pairs import EncodedPair
from ..data.stream import MicroBatches
from ..kernels.lora_math import cast_once
from . import distributed, reference as ref_mod
from .pair_logps import Item, answer_tokens, collate_pairs, input_tokens, sequence_logps, share
from .step import apply_update, clip_and_read

if TYPE_CHECKING:
    from .run_plan import RunPlan
    from .state import Run

# the metrics of a step and of an evaluation: per-record means, logged as they are named (TRL's names)
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
           "logps/rejected", "sft_loss", "odds_ratio_loss", "log_odds_ratio", "kl")


def kto_partners(pairs: list[EncodedPair], max_len: int = 0) -> list[EncodedPair]:
    """KTO's records with their mismatched answer in `rejected`: record i's prompt with the answer of record
    i + 1 (the last with the first's), the fixed pairing TRL makes once for its KL estimate; cut to max_len
    tokens (0: uncut) as the record itself was."""
    n = len(pairs)
    room = [max(1, max_len - len(p.prompt)) if max_len else None for p in pairs]
    return [dataclasses.replace(p, rejected=list(pairs[(i + 1) % n].chosen)[:room[i]]) for i, p in enumerate(pairs)]


def items(pairs: list[EncodedPair], objective: str, split: str = "train", max_len: int = 0) -> list[Item]:
    """The records as the stream and the reference read them (KTO's with their mismatched answers, max_len
    tokens at most)."""
    if objective in objectives.UNPAIRED:
        pairs = kto_partners(pairs, max_len)
    return [Item(p, i, split) for i, p in enumerate(pairs)]


def fingerprint(records: list[Item]) -> dict:
    """What a resume checks, and what a precomputed reference is keyed by: every record's tokens and label."""
    h = hashlib.sha256()
    for r in records:
        p = r.pair
        for part in (p.prompt, p.chosen, p.rejected):
            h.update(array("q", part).tobytes() + b"|")
        h.update(repr(p.label).encode() + b"\n")
    return {"records": len(records), "sha256": h.hexdigest()}


def sizes(pairs: list[EncodedPair]) -> list[tuple[int, int]]:
    """(width of its two rows, answer tokens of both) of every record, longest first: the rows the memory estimate
    and the batch split read (memory.pair_rows makes each two sequences)."""
    return sorted(((len(p.prompt) + max(len(p.chosen), len(p.rejected)), len(p.chosen) + len(p.rejected))
                   for p in pairs), reverse=True)


def summarize(metrics: dict[str, list[torch.Tensor]], device: str = "cpu") -> dict[str, float]:
    """Per-record means of every metric over every rank's records; KTO's margin is the difference of its two
    means."""
    local = []
    for key in METRICS:
        values = torch.cat([v.detach().double().reshape(-1).cpu() for v in metrics.get(key, [])] or [torch.zeros(0)])
        local += [float(values.sum()), values.numel()]
    sums = distributed.all_sum(local, device)
    row = {key: sums[2 * i] / sums[2 * i + 1] for i, key in enumerate(METRICS) if sums[2 * i + 1]}
    if "rewards/margins" not in row and {"rewards/chosen", "rewards/rejected"} <= row.keys():
        row["rewards/margins"] = row["rewards/chosen"] - row["rewards/rejected"]
    return {k: row[k] for k in METRICS if k in row}


@dataclass
class PairObjective:
    """What `fit` needs to train on preference records instead of answers."""
    objective: str  # dpo | ipo | simpo | orpo | kto
    pref: PreferenceConfig  # the config's preference section
    reference: str  # adapter_off | precomputed | copy | none (reference.resolve)
    pad: int
    chunked: bool = True
    ref: Callable | None = None  # (model, items, batch) -> (ref chosen, ref rejected); set by start()
    packed: bool = False  # each micro-batch's sequences in one packed row (set by stream from the run's packing)

    fingerprint = staticmethod(fingerprint)

    def stream(self, records: list[Item], tc: TrainConfig, packing: str = "off") -> MicroBatches:
        """Micro-batches of micro_batch_size records (two sequences each); with the run's packing on, each
        micro-batch's sequences are collated as one packed row (bins of records do not apply to pairs)."""
        self.packed = packing != "off"
        return MicroBatches(records, tc.micro_batch_size, tc.seed)

    def start(self, model: torch.nn.Module, splits: dict[str, list[Item]], out_dir: Path, device: str,
              batch_size: int, context: Callable = contextlib.nullcontext,
              log: Callable[[str], None] = print, plan: RunPlan | None = None) -> None:
        """The reference, before the first step's update and before a resume loads trained weights: a
        precomputed one is computed (or read back) from the model as loaded. plan: the run's, unused here (a
        preference step's memory is the run's estimate, printed before the model loads)."""
        if self.reference == "adapter_off":
            self.ref = ref_mod.AdapterOff()
        elif self.reference == "copy":
            self.ref = ref_mod.Copy(model)
        elif self.reference == "precomputed":
            digest = hashlib.sha256("".join(fingerprint(v)["sha256"] for v in splits.values()).encode()).hexdigest()
            self.ref = ref_mod.load_or_compute(
                Path(out_dir) / ref_mod.REFERENCE_FILE, digest,
                lambda: ref_mod.compute(model, splits, self.pad, device, batch_size, context),
                distributed.is_main(), log)

    def logps(self, model: torch.nn.Module, records: list[Item], batch: dict) -> objectives.Logps:
        """The policy's answer log-probabilities (with gradients) and the reference's, for one micro-batch."""
        logps, counts = sequence_logps(model, batch, self.chunked)
        n = len(records)
        lp = objectives.Logps(logps[:n], logps[n:], counts[:n], counts[n:])
        if self.ref is not None:
            lp.ref_chosen, lp.ref_rejected = self.ref(model, records, batch)
        if self.objective in objectives.UNPAIRED:
            lp.label = torch.tensor([bool(r.pair.label) for r in records], device=logps.device)
        return lp

    def step(self, run: Run, records: list[list[Item]], context: Callable) -> dict:
        """One optimizer step over the micro-batches `records`; the loop's row (loss, grad_norm, trained_tokens,
        computed_tokens, data_s, nonfinite) plus the objective's metrics. Several processes: each rank takes its
        share of every micro-batch; FSDP averages the gradients over ranks, so each rank's loss is scaled by
        their number."""
        rank, world = distributed.rank(), distributed.size()
        began = time.perf_counter()
        shares = [share(rs, rank, world) for rs in records]
        batches = [collate_pairs(mine, self.pad, run.device, self.packed) for mine, _ in shares]
        data_s = time.perf_counter() - began
        total_records = sum(len(rs) for rs in records)
        total, metrics = torch.zeros((), dtype=torch.float64, device=run.device), defaultdict(list)
        with cast_once():  # each adapter cast once for the step's forwards and backwards
            for (mine, counts), batch in zip(shares, batches):
                with context():
                    loss, parts = objectives.loss(self.objective, self.logps(run.model, mine, batch), self.pref)
                weighted = loss * (len(mine) * counts / total_records)
                scaled = weighted * world if world > 1 else weighted
                (run.scaler.scale(scaled) if run.scaler.is_enabled() else scaled).backward()
                total += weighted.detach().double()
                for k, v in parts.items() if counts else ():
                    metrics[k].append(v)
        distributed.all_sum_(total)
        run.seen += sum(input_tokens(rs) for rs in records)
        read = clip_and_read(run.optimizer, run.cfg.train.max_grad_norm, run.scaler, total)
        row = apply_update(run.optimizer, run.scheduler, run.scaler, read, {"loss": read[0]})
        row.update(summarize(metrics, run.device), trained_tokens=sum(answer_tokens(rs) for rs in records),
                   data_s=data_s, computed_tokens=sum(b["input_ids"].numel() for b in batches))
        return row


def check(cfg: Config, world: int) -> None:
    """Refuse, in one line, what this step cannot run."""
    if world > 1 and cfg.train.reference == "copy":
        raise ConfigError(f"train.reference=copy on {world} processes: a copy of a sharded model is not made; use "
                          "train.reference=auto")


@torch.no_grad()
def evaluate(model: torch.nn.Module, objective: PairObjective, records: list[Item], batch_size: int, device: str,
             context: Callable = contextlib.nullcontext) -> dict[str, float]:
    """Held-out records: the objective's mean loss and its metrics (preference accuracy: rewards/accuracy;
    mean margin: rewards/margins), in eval mode."""
    was = model.training
    model.eval()
    total, metrics = 0.0, defaultdict(list)
    try:
        for start in range(0, len(records), batch_size):
            rs = records[start:start + batch_size]
            with context():
                loss, parts = objectives.loss(objective.objective,
                                              objective.logps(model, rs, collate_pairs(rs, objective.pad, device,
                                                                                    objective.packed)),
                                              objective.pref)
            total += float(loss) * len(rs)
            for k, v in parts.items():
                metrics[k].append(v)
    finally:
        model.train(was)
    return {"loss": total / max(len(records), 1), "records": len(records), **summarize(metrics, device)}
