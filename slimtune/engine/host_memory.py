"""The CPU's memory, checked before the model loads: a run whose predicted need passes what the machine has
available stops with one line naming its longest record, instead of dying in the allocator mid-step (a
5,000-turn record with data.max_turns=0 data.max_len=100000 asked the CPU allocator for 33.8 GB).

The need is the estimate (engine/memory.py) in the precision the CPU trains in, for the worst micro-batch of
padded rows, plus the attention scores: PyTorch's CPU attention with a padding (or per-record) mask computes
the whole rows x heads x length x length matrix at once, which the GPU's kernels never hold. On SmolLM2-135M
(fp32, LoRA, 4 x 512 tokens) the estimate said 5.0 GiB of tensors and the process's peak RSS was 4.9 GiB.
"""
from __future__ import annotations

import os
from dataclasses import replace

from ..config import Config
from ..data.encode import Encoded
from ..errors import SlimtuneError
from ..models import load_config
from . import memory, precision
from .memory import BYTES, GIB

CUTS = (32768, 16384, 8192, 4096, 2048, 1024, 512, 256)  # data.max_len values a refusal may suggest


class HostMemoryError(SlimtuneError):
    """The run is predicted to need more CPU memory than the machine has available."""


def available() -> float | None:
    """Bytes the system can give this process without swapping: MemAvailable of /proc/meminfo, else the free
    pages (os.sysconf); None where neither can be read (psutil is not a dependency)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def local_processes() -> int:
    """How many training processes share this machine's memory (torchrun's LOCAL_WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def attention_scores(heads: int, rows: int, width: int, nbytes: int) -> float:
    """Bytes of one layer's attention scores over a padded micro-batch. Measured on the CPU (torch SDPA,
    fp32): 2 rows x 4 heads x 4096 tokens with a padding mask raised the peak RSS by 0.42 GB (this: 0.54 GB);
    without a mask, 0.09 GB."""
    return rows * heads * width * width * nbytes


def need(cfg: Config, rows: list[tuple[int, int]], heads: int) -> tuple[float, float]:
    """(bytes of the micro-batch `rows` ((length, trained tokens) each) on the CPU, of which attention scores):
    the padded engine's estimate in the CPU's precision (auto is fp32 there) plus the scores."""
    name = precision.resolve(cfg.train.precision, "cpu")
    cpu = replace(cfg, train=replace(cfg.train, precision=name, packing="off"))  # padded rows: an upper bound
    plan = precision.choose_dtypes(name, "cpu", cfg.train.adam_eps)
    scores = attention_scores(heads, len(rows), max(n for n, _ in rows), BYTES[plan.autocast or plan.weights])
    return memory.estimate(cpu, rows).peak_allocated + scores, scores


def _worst(cfg: Config, train: list[Encoded], held: list[Encoded],
           heads: int) -> tuple[float, float, list[tuple[int, int]], Encoded, bool]:
    """(need, scores, rows, the longest record, whether it is held out) of the heavier of the worst training
    micro-batch and the longest held-out record's forward pass (checkpointed: no backward follows)."""
    longest = sorted(train, key=lambda e: -len(e.input_ids))[: cfg.train.micro_batch_size]
    rows = [(len(e.input_ids), sum(x != -100 for x in e.labels)) for e in longest]
    worst = (*need(cfg, rows, heads), rows, longest[0], False)
    if held:
        top = max(held, key=lambda e: len(e.input_ids))
        if len(top.input_ids) > rows[0][0]:
            light = replace(cfg, train=replace(cfg.train, gradient_checkpointing=True))
            one = [(len(top.input_ids), len(top.input_ids))]
            other = (*need(light, one, heads), one, top, True)
            worst = max(worst, other, key=lambda w: w[0])
    return worst


def check(cfg: Config, train: list[Encoded], held: list[Encoded], free: float | None = None) -> None:
    """Refuse, before the model loads, a CPU run predicted to need more memory than is available (`free`
    bytes; default: available()): one line naming the longest record and a data.max_len that would fit."""
    free = available() if free is None else free
    if free is None or not train:
        return
    try:
        heads = load_config(cfg.model.path, cfg.model.trust_remote_code).num_attention_heads
        total, scores, rows, record, is_held = _worst(cfg, train, held, heads)
    except Exception:  # an estimate never stops a run: architectures differ in ways it can't see (train.py)
        return
    if total <= free:
        return
    width = rows[0][0]
    light = replace(cfg, train=replace(cfg.train, gradient_checkpointing=True)) if is_held else cfg
    cut = next((n for n in CUTS if n < width and need(light, [(min(a, n), min(b, n)) for a, b in rows], heads)[0]
                <= free), None)
    fix = f"set data.max_len={cut}" if cut else "lower data.max_len"
    batch = "its forward pass for the held-out loss" if is_held else f"a micro-batch of {len(rows)} records"
    raise HostMemoryError(
        f"{record.where}: this record's {width} tokens need about {total / GIB:.1f} GiB of CPU memory in {batch} "
        f"(attention scores alone {scores / GIB:.1f} GiB: they grow with the square of the length), and "
        f"{free / GIB:.1f} GiB is available; {fix} (longer records are truncated to it)")
