"""Where a training step's seconds go, measured on the host, and the steps that stall.

Each optimizer step reads the device once (loss, gradient norm) after its backward, so the host's clock around a
step holds the GPU's work for it too: `step_s` is the step's wall time, `data_s` its share spent collating and
queueing the copies of its records, and `host_s` what the loop spent between the previous step and this one
(metrics, TensorBoard, checkpoints, evaluation). metrics.jsonl gets the three per step; the summary gets the
median and slowest step and the stalls: steps after this process's first that took over STALL_FACTOR x the
median in seconds per computed token (a lazily built kernel, an allocator growing, a recompile; not a step whose
records are longer). Two pauses outside a step's own work are counted per step (Pauses): seconds in Python's
garbage collector (`gc_s`) and, on CUDA, the caching allocator's retries and new device allocations
(`alloc_retries`, `device_allocs`); a stall's line names them. With train.profile_step = N, torch.profiler
records steps N and N + 1 and their busiest ops go to profile.txt in the run folder, with the device's idle time
over those steps and its longest gaps, each with the host op that was running where it began and where it ended.
With STACKS on (bench/speed.py's diagnostic) it also lists the copies, casts and adds by the Python frames, and in
backward the autograd node, that made them.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

STALL_FACTOR = 2.0  # a step over twice the median is a stall
PROFILED_STEPS = 2  # profile_step and the one after: the second shows the steady state if the first is special
STACKS = False  # the profile also groups these ops by the Python stack that called them (bench/speed.py's diagnostic)
STACK_OPS = ("aten::clone", "aten::copy_", "aten::contiguous", "aten::_to_copy", "aten::add", "aten::mul")


def stalls(step_s: dict[int, float], factor: float = STALL_FACTOR,
           tokens: dict[int, int] | None = None) -> list[tuple[int, float]]:
    """(step, seconds) of the steps over `factor` x the median, the first step of the dict left out (it builds
    kernels, compiles, allocates): every step after it should take about as long as the others. With `tokens`
    (the tokens each step computed, padding included) the seconds per token are compared instead, so a step
    that is long because its batch is (padded records on the CPU vary several-fold) is no stall."""
    steps = sorted(step_s)[1:]
    if len(steps) < 3:
        return []
    per = {s: step_s[s] / tokens[s] for s in steps} if tokens and all(tokens.get(s) for s in steps) else \
        {s: step_s[s] for s in steps}
    median = statistics.median(per.values())
    return [(s, step_s[s]) for s in steps if per[s] > factor * median]


class Pauses:
    """What can pause a step besides its own work, counted between two read()s: seconds in Python's garbage
    collector (a full collection scans every tracked object: 0.23 s for 454,000 with torch, transformers and peft
    loaded, on a 2-core CPU) and, on CUDA, the caching allocator's retries (a cudaMalloc that failed, every cached
    block freed, then tried again, waiting for the device) and its new device allocations (cudaMalloc calls: its
    cache growing).

    As a context manager around training on CUDA (or with freeze=True) it also collects, then freezes the objects
    alive when training starts (the model, the imported libraries: gc.freeze), so full collections scan only what
    the run made since; they are unfrozen at the end. That holds where something else had frozen objects before
    (on an H100 machine 375 were, and a Pauses that stood aside for them left 706,000 objects to each full
    collection, 0.46-0.49 s apiece): gc unfreezes all or none, so those are unfrozen at the end too. Not on the
    CPU by default: there a run is short and its step no faster, and the collection up front would cost each of
    the test suite's hundreds of runs.

    The first step makes many long-lived objects of its own (Triton's and dynamo's compiled kernels, the offload
    buffers): settle() after it collects and freezes once more, and after any later full collection freezes what
    it found alive, so each object is scanned by at most one full collection while training. Frozen objects are
    still freed when their last reference goes; only a cycle among them waits for the unfreeze. Measured before
    this (H100, 8B, 200 steps, frozen at the start only): three full collections of 0.35-0.44 s, the slowest
    step 0.83 s against a 0.47 s median."""

    def __init__(self, device: str, freeze: bool | None = None) -> None:
        self.cuda = device.startswith("cuda") and torch.cuda.is_available()
        self.freeze = device.startswith("cuda") if freeze is None else freeze
        self.gc_s, self._began, self._froze, self._full, self._settled = 0.0, None, False, False, False
        self._counts = self._count()

    def _count(self) -> tuple[int, int]:
        if not self.cuda:
            return 0, 0
        stats = torch.cuda.memory_stats()
        return int(stats.get("num_alloc_retries", 0)), int(stats.get("num_device_alloc", 0))

    def _gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._began is not None:
            self.gc_s += time.perf_counter() - self._began
            self._began = None
            self._full = self._full or info.get("generation") == 2

    def __enter__(self) -> Pauses:
        if self.freeze:
            gc.collect()
            gc.freeze()
            self._froze = True
        gc.callbacks.append(self._gc)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._gc)
        if self._froze:
            gc.unfreeze()
            self._froze = False

    def settle(self) -> None:
        """Called after each step: freeze what a full collection found alive (after the first step, the first call:
        collect first), where this froze."""
        first, self._settled = not self._settled, True
        if self._froze and (first or self._full):
            if first:
                gc.collect()
            gc.freeze()
        self._full = False

    def read(self) -> dict:
        """{"gc_s", "alloc_retries", "device_allocs"} since the previous read."""
        counts = self._count()
        out = {"gc_s": round(self.gc_s, 4), "alloc_retries": counts[0] - self._counts[0],
               "device_allocs": counts[1] - self._counts[1]}
        self.gc_s, self._counts = 0.0, counts
        return out


def cause(pauses: dict | None) -> str:
    """What a stalled step's pauses held, as a short text ("" when nothing)."""
    if not pauses:
        return ""
    said = ([f"{pauses['gc_s']:.2f} s in garbage collection"] if pauses.get("gc_s", 0) >= 0.01 else []) + \
        ([f"{pauses['alloc_retries']} allocator retries"] if pauses.get("alloc_retries") else []) + \
        ([f"{pauses['device_allocs']} new device allocations"] if pauses.get("device_allocs") else [])
    return f" ({', '.join(said)})" if said else ""


@dataclass
class StepClock:
    """This process's step times (a resumed run's own steps only)."""
    step_s: dict[int, float] = field(default_factory=dict)
    tokens: dict[int, int] = field(default_factory=dict)  # tokens each step computed (padding included)
    pauses: dict[int, dict] = field(default_factory=dict)  # each step's Pauses.read()
    _mark: float | None = None  # when the previous step's compute ended
    _began: float = 0.0

    def start(self) -> float:
        """Called as a step begins; returns the host seconds spent since the previous step ended."""
        now = time.perf_counter()
        host = 0.0 if self._mark is None else now - self._mark
        self._began = now
        return host

    def stop(self, step: int, tokens: int = 0, pauses: dict | None = None) -> float:
        """Called once the step's update is queued; returns its seconds."""
        self._mark = time.perf_counter()
        self.step_s[step] = self._mark - self._began
        if tokens:
            self.tokens[step] = tokens
        if pauses is not None:
            self.pauses[step] = pauses
        return self.step_s[step]

    def summary(self) -> dict:
        """The median and slowest step and the stalls, for the run's result (nothing before two steps)."""
        steps = sorted(self.step_s)[1:]
        if len(steps) < 2:
            return {}
        slowest = max(steps, key=self.step_s.get)
        found = stalls(self.step_s, tokens=self.tokens)
        return {"step_s_median": statistics.median(self.step_s[s] for s in steps),
                "step_s_max": self.step_s[slowest], "slowest_step": slowest,
                "stalls": [[s, round(t, 4)] for s, t in found[:20]], "stall_count": len(found),
                "stall_causes": {s: why for s, _ in found[:20] if (why := cause(self.pauses.get(s)))}}


def summary_line(times: dict) -> str | None:
    """One printed line about the stalls, or None when there were none."""
    if not times.get("stall_count"):
        return None
    causes = times.get("stall_causes", {})
    shown = ", ".join(f"step {s}: {t:.2f} s{causes.get(s, '')}" for s, t in times["stalls"][:5])
    return (f"warning: {times['stall_count']} step(s) took over {STALL_FACTOR:g}x the median step's time per token "
            f"(median step {times['step_s_median']:.3f} s): {shown} (metrics.jsonl has every step's step_s, data_s, "
            "host_s, gc_s, alloc_retries and device_allocs)")


def idle(busy: list[tuple[float, float]], host: list[tuple[float, float, str]], window: tuple[float, float],
         top: int = 8) -> dict:
    """The device's idle time within `window` (start, end): the window less the union of the `busy` intervals (its
    kernels and copies, every stream), and the `top` longest gaps, longest first, as (length, the innermost `host`
    op (start, end, name) running where the gap began, and where it ended: what the device waited on)."""
    lo, hi = window
    merged: list[list[float]] = []
    for start, end in sorted((max(a, lo), min(b, hi)) for a, b in busy if b > lo and a < hi):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    edges = [lo] + [t for span in merged for t in span] + [hi]
    gaps = sorted(((b - a, a, b) for a, b in zip(edges[::2], edges[1::2]) if b > a), reverse=True)[:top]

    def at(t: float) -> str:
        inside = [h for h in host if h[0] <= t <= h[1]]
        return max(inside, key=lambda h: (h[0], -h[1]))[2] if inside else "-"
    return dict(window=hi - lo, busy=sum(b - a for a, b in merged),
                gaps=[(length, at(a), at(b)) for length, a, b in gaps])


def _idle_text(events: list) -> str:
    """idle() over a profile's events (microseconds), as the lines profile.txt ends with."""
    steps = [e for e in events if e.name.startswith("slimtune step ")]
    device = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU]
    if not steps or not device:
        return ""
    host = [(e.time_range.start, e.time_range.end, e.name) for e in events
            if e.device_type == torch.autograd.DeviceType.CPU and not e.name.startswith(("slimtune step ", "cu"))]
    got = idle([(e.time_range.start, e.time_range.end) for e in device], host,
               (min(e.time_range.start for e in steps), max(e.time_range.end for e in steps)))
    lines = [f"\nDevice idle: {got['window'] / 1e3:.1f} ms of steps, busy {got['busy'] / 1e3:.1f} ms "
             f"({got['busy'] / max(got['window'], 1e-9):.0%}); the longest gaps (ms: host op where it began -> where "
             "it ended):"]
    lines += [f"  {length / 1e3:8.2f}  {began} -> {ended}" for length, began, ended in got["gaps"]]
    return "\n".join(lines) + "\n"


def _stacks_text(events: list, on_device: bool) -> str:
    """STACK_OPS' calls grouped by op, input shapes and where they were called: the innermost Python frames, and
    in backward the autograd node that ran them first (backward's Python frames are only where it was started)."""
    groups: dict[tuple, list] = {}
    for e in events:
        if e.name not in STACK_OPS or (e.cpu_parent is not None and e.cpu_parent.name in STACK_OPS):
            continue
        node = e.cpu_parent  # the nearest autograd node around it, in backward
        while node is not None and not node.name.startswith("autograd::engine::evaluate_function"):
            node = node.cpu_parent
        frames = ([node.name] if node is not None else []) + [f for f in e.stack if ".py(" in f][:6]
        key = (e.name, str(e.input_shapes), tuple(frames))
        got = groups.setdefault(key, [0, 0.0, 0.0])
        got[0] += 1
        got[1] += e.device_time_total
        got[2] += e.cpu_time_total
    busiest = sorted(groups.items(), key=lambda kv: -kv[1][1 if on_device else 2])[:25]
    lines = ["\nBy where they were called (the 25 busiest; an op inside another of these is counted in it):"]
    for (name, shapes, frames), (n, dev, host) in busiest:
        lines.append(f"{name} x{n}  device {dev / 1e3:.2f} ms  host {host / 1e3:.2f} ms  shapes {shapes}")
        lines += [f"    {frame}" for frame in frames]
    return "\n".join(lines) + "\n"


class Profiler:
    """torch.profiler over steps `first` and `first + 1` (train.profile_step; 0 = off): `around(step)` wraps each
    step, and once the last one is done the table of the busiest ops, by device time and by host time, is written
    to `path`."""

    def __init__(self, first: int, path: Path, device: str) -> None:
        self.first, self.path, self.device = first, Path(path), device
        self.prof = None

    def around(self, step: int) -> contextlib.AbstractContextManager:
        """A context for the step about to run (its number counted from 1)."""
        if not self.first or not self.first <= step < self.first + PROFILED_STEPS:
            return contextlib.nullcontext()
        return self._profiled(step)

    @contextlib.contextmanager
    def _profiled(self, step: int) -> Iterator[None]:
        from torch.profiler import ProfilerActivity, profile

        if self.prof is None:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.startswith("cuda") else [])
            verbose = torch._C._profiler._ExperimentalConfig(verbose=True) if STACKS else None  # the frames kept
            self.prof = profile(activities=acts, with_stack=STACKS, record_shapes=STACKS, experimental_config=verbose)
            self.prof.__enter__()
        with torch.profiler.record_function(f"slimtune step {step}"):
            yield
        if step == self.first + PROFILED_STEPS - 1:
            self.finish()

    def finish(self) -> None:
        """Stop and write the table (also when the run ends inside the profiled steps)."""
        if self.prof is None:
            return
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.prof.__exit__(None, None, None)
        table = self.prof.key_averages()
        by_device = "self_device_time_total" if self.device.startswith("cuda") else "self_cpu_time_total"
        head = (f"torch.profiler over steps {self.first}-{self.first + PROFILED_STEPS - 1} "
                f"(train.profile_step={self.first})\n")
        text = head + "\nBy device time:\n" + table.table(sort_by=by_device, row_limit=40) + \
            "\nBy host time:\n" + table.table(sort_by="cpu_time_total", row_limit=40) + _idle_text(self.prof.events())
        if STACKS:
            text += _stacks_text(self.prof.events(), self.device.startswith("cuda"))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(text)
        self.prof = None
