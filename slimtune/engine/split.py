"""The split of train.batch_size (records per optimizer step) into micro_batch_size x grad_accum, with
gradient checkpointing and activation offload, when the config leaves the split to slimtune (auto).

On a GPU the candidates are tried fastest first and the first whose predicted peak (engine/memory.py, with
the CUDA context) fits the free memory less a margin wins:
- fewer micro-batches first: a small model's step is paced by the CPU launching kernels, so one micro-batch
  of all the records is fastest (H100, 1B LoRA, 16 records a step: 16 x 1 offloaded 14.5k tok/s, 8 x 2
  8.6k; 8B 7.8k vs 5.6k);
- always the leanest mode: checkpointing, with the layer inputs offloaded to CPU memory on the fast engine
  (the padded engine's estimate does not model offload). Lean because on the H100 the offloaded 16 x 1 step
  was as fast as the kept one (1B: 14.8-19.6k vs 16.7-19.1k tok/s over five runs each) at a lower peak (3.36
  vs 3.61 GiB), and a default run should not take more memory than a peer's (unsloth 3.59 GiB); dropping
  checkpointing saves recomputation but costs several times the memory (1B 16 x 1: 32.5 vs 6.5 GiB
  predicted), so a user who wants it sets the split and gradient_checkpointing=false.
What the user turned on (checkpointing, offload) stays on. On the CPU there is no GPU memory to fit and no
launch cost to hide: the largest micro-batch up to CPU_MICRO records that divides the batch.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..config import Config
from ..config.batch import is_auto, records_per_step, stated
from ..config.convert import AUTO
from ..kernels import select
from ..kernels.select import Kernels
from ..models import load_config, pick_device
from . import distributed, host_memory, memory
from .memory import GIB
from .precision import Dtypes

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Sizes = list[tuple[int, int]]  # (length, trained tokens) of training records, longest first

CPU_MICRO = 8  # CPU: bounds a padded micro-batch's activations; no launch overhead to amortise there (not measured)
# kept free beyond the predicted peak: the estimator was within 10% (max 9.9%) of 367 measured H100 cells
# (README, bench/check_estimator.py)
MARGIN = 0.10
# the most tokens a micro-batch may hold for the plan to leave its MLP whole: the slices began past this many
# tokens until 2026-12-06, so micro-batches up to it trained whole in every GPU run and estimate check before
WHOLE_TOKENS = 65536
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")  # what the estimate reads


@dataclass(frozen=True)
class Option:
    """One way to train a step's records; peak: its predicted peak with the CUDA context (bytes), None on CPU."""
    micro_batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    offload_activations: bool
    peak: float | None = None
    host: float = 0.0  # pinned CPU memory its offloaded layer inputs take (bytes)

    def text(self) -> str:
        extra = ", checkpointing" if self.gradient_checkpointing else ""
        extra += ", offloaded" if self.offload_activations else ""
        return f"{self.micro_batch_size} x {self.grad_accum}{extra}"


@dataclass(frozen=True)
class Split:
    """What was chosen for a step's records, why, and (on a GPU) the faster options rejected for memory."""
    batch_size: int
    chosen: Option
    why: str
    free: float | None = None  # GPU memory free for this run (bytes)
    rejected: tuple[Option, ...] = ()
    whole_mlp: bool = False  # micro-batches past select.TILE_TOKENS tokens that fit with the MLP unsliced

    @property
    def budget(self) -> float | None:
        return None if self.free is None else self.free * (1 - MARGIN)

    def apply(self, cfg: Config) -> Config:
        """cfg with the split written into train.* (batch_size included): what the run and its config.yaml hold."""
        c = self.chosen
        return replace(cfg, train=replace(cfg.train, batch_size=self.batch_size, micro_batch_size=c.micro_batch_size,
                                          grad_accum=c.grad_accum, gradient_checkpointing=c.gradient_checkpointing,
                                          offload_activations=c.offload_activations))

    def describe(self) -> str:
        """The short block train and estimate print."""
        lines = [f"batch split: {self.batch_size} records per step as {self.chosen.text()} "
                 f"(micro_batch_size x grad_accum); {self.why}"]
        if self.chosen.peak is not None and self.free is not None:
            lines.append(f"  predicted peak {self.chosen.peak / GIB:.2f} GiB of {self.free / GIB:.2f} GiB free "
                         f"({self.budget / GIB:.2f} GiB usable, {MARGIN:.0%} kept as margin)")
        for o in self.rejected[:4]:
            lines.append(f"  rejected {o.text()}: predicted {o.peak / GIB:.2f} GiB, over the budget")
        if len(self.rejected) > 4:
            lines.append(f"  (and {len(self.rejected) - 4} more, each over the budget)")
        return "\n".join(lines)


def divisors(n: int) -> list[int]:
    """n's divisors, largest first: the micro-batch sizes that split n records evenly."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


def _mode(cfg: Config, kernels: Kernels | None = None) -> tuple[bool, bool]:
    """(checkpointing, offload): the leanest the config allows (a heavier mode never fits where a leaner one
    does not, so only the micro-batch size is searched); never turns off what the user turned on."""
    tc = cfg.train
    if cfg.method.name == "prefix_tuning":  # trains without checkpointing whatever is asked (engine/recompute.py)
        return False, tc.offload_activations
    return True, tc.offload_activations or memory.fast_engine(cfg, kernels)


def fixed(cfg: Config) -> Split:
    """The split a config states (micro_batch_size or grad_accum set; the other follows from batch_size)."""
    tc = cfg.train
    batch, micro, accum = stated(tc)
    return Split(batch, Option(micro, accum, tc.gradient_checkpointing, tc.offload_activations), "as configured")


def on_cpu(cfg: Config, reason: str = "") -> Split:
    """The CPU's rule: the largest micro-batch of at most CPU_MICRO records that divides the batch."""
    tc, batch = cfg.train, records_per_step(cfg.train)
    micro = next(d for d in range(min(batch, CPU_MICRO), 0, -1) if batch % d == 0)
    why = reason or (f"on the CPU no GPU memory limits the split and no kernel launches pace it: the largest "
                     f"micro-batch of at most {CPU_MICRO} records that divides the batch")
    return Split(batch, Option(micro, batch // micro, tc.gradient_checkpointing, tc.offload_activations), why)


def choose(cfg: Config, device: str, free: float | None = None, sizes: Sizes | None = None, gpus: int = 1,
           model: torch.nn.Module | None = None, kernels: Kernels | None = None, dtypes: Dtypes | None = None) -> Split:
    """The fastest split of the batch whose predicted peak fits `free` bytes (default: what the GPU has free)
    less MARGIN; deterministic for a given model shape, config and free figure.

    Args:
        sizes: (length, trained tokens) of the training records, longest first (the worst micro-batch of m
            records is the first m); None: micro-batches of data.max_len tokens, all trained.
        gpus: several processes (FSDP2): the estimate is per GPU.
        model: the model to train, when already built: the estimate reads its transformers config; one
            without (a module built in code) must have model.path's shape, else the CPU's rule is used.
        kernels, dtypes: the run plan's (engine/run_plan.py), which the estimate counts; default a GPU run's.
    """
    if not device.startswith("cuda"):
        return on_cpu(cfg)
    mcfg = _config_of(model)
    other = _other_shape(cfg, model) if model is not None and mcfg is None else None
    if other:
        return on_cpu(cfg, f"{other}, so the memory estimate (made from model.path) does not apply; the CPU's "
                           f"rule: at most {CPU_MICRO} records a micro-batch (set train.micro_batch_size to choose)")
    free = free_memory(device) if free is None else free
    batch, rejected = records_per_step(cfg.train), []
    ck, off = _mode(cfg, kernels)
    try:
        for micro in divisors(batch):
            option = _estimated(cfg, Option(micro, batch // micro, ck, off), sizes, gpus, mcfg, kernels, dtypes)
            option, host_note = _host_fit(cfg, option, sizes, gpus, mcfg, kernels, dtypes)
            if option.peak <= free * (1 - MARGIN):
                why = "the fewest micro-batches that fit" + (
                    ", without checkpointing" if not option.gradient_checkpointing else ", with checkpointing"
                    if not option.offload_activations else ", with checkpointing and the layer inputs offloaded")
                option, whole = _whole_mlp(cfg, option, sizes, gpus, mcfg, kernels, dtypes, free)
                why += "; the MLP unsliced (it fits whole)" if whole else ""
                return Split(batch, option, why + host_note, free, tuple(rejected), whole)
            rejected.append(option)
    except Exception as err:  # an estimate never stops a run: architectures differ in ways it can't see
        return on_cpu(cfg, f"memory estimate unavailable ({err}); the CPU's rule: at most {CPU_MICRO} records "
                           "a micro-batch")
    smallest = min(rejected, key=lambda o: (o.peak, -o.micro_batch_size))
    return Split(batch, smallest, "nothing is predicted to fit: the split with the smallest predicted peak "
                 "(`slimtune estimate CONFIG --budget N` says what else would bring it down)", free,
                 tuple(o for o in rejected if o is not smallest))


def _host_fit(cfg: Config, option: Option, sizes: Sizes | None, gpus: int, mcfg: PretrainedConfig | None,
              kernels: Kernels | None, dtypes: Dtypes | None) -> tuple[Option, str]:
    """An offload auto chose whose layer inputs the CPU memory available cannot hold (less MARGIN; every process
    of this machine offloads its own): the same split with them kept on the GPU, and the reason said; the option
    as it is otherwise, and the user's own train.offload_activations=true always (train.py warns)."""
    have, ranks = host_memory.available(), host_memory.local_processes()
    if not option.offload_activations or cfg.train.offload_activations or have is None \
            or option.host * ranks <= have * (1 - MARGIN):
        return option, ""
    kept = _estimated(cfg, replace(option, offload_activations=False), sizes, gpus, mcfg, kernels, dtypes)
    return kept, (f" (layer inputs kept on the GPU: offloaded they would take {option.host * ranks / GIB:.1f} GiB "
                  f"of CPU memory, {have / GIB:.1f} GiB is available)")


def _whole_mlp(cfg: Config, option: Option, sizes: Sizes | None, gpus: int, mcfg: PretrainedConfig | None,
               kernels: Kernels | None, dtypes: Dtypes | None, free: float) -> tuple[Option, bool]:
    """train.tiled_mlp=auto slices the MLP of a forward past select.TILE_TOKENS tokens, at the cost of one more MLP
    forward in its backward. Where the chosen option's micro-batches can pass that and the option still fits with
    the MLP whole, the plan leaves it whole: (that option, its peak unsliced, True); else (option, False)."""
    if kernels is None or not kernels.tiled_mlp or cfg.train.tiled_mlp != "auto" or gpus > 1:
        return option, False
    micro = option.micro_batch_size
    tokens = sum(n for n, _ in sizes[:micro]) if sizes and kernels.packing == "rows" else \
        micro * (sizes[0][0] if sizes else cfg.data.max_len)  # the most a forward holds: packed, or padded
    if not select.TILE_TOKENS < tokens <= WHOLE_TOKENS:
        return option, False  # never sliced, or longer than any micro-batch the MLP has trained whole on a GPU
    whole = _estimated(cfg, option, sizes, gpus, mcfg, replace(kernels, tiled_mlp=0), dtypes)
    return (whole, True) if whole.peak <= free * (1 - MARGIN) else (option, False)


def _other_shape(cfg: Config, model: torch.nn.Module) -> str | None:
    """How `model` differs from model.path's config.json in the sizes the estimate reads, or None."""
    try:
        want = load_config(cfg.model.path, cfg.model.trust_remote_code)
    except Exception as err:  # a model built in code may have no folder behind model.path
        return f"model.path {cfg.model.path!r} gives no config.json ({err})"
    have = getattr(model, "config", None)
    diff = [k for k in SHAPE_KEYS if getattr(have, k, None) != getattr(want, k, None)]
    return f"the model differs from model.path {cfg.model.path!r} in {', '.join(diff)}" if diff else None


def _config_of(model: torch.nn.Module | None) -> PretrainedConfig | None:
    """A transformers model's own config, as the estimate builds it on the meta device (without the 4-bit
    quantization a qlora model was loaded with: the estimate counts that from method.quant_bits); or None."""
    mcfg = getattr(getattr(model, "base_model", model), "config", None) if model is not None else None
    if mcfg is None or not all(hasattr(mcfg, k) for k in SHAPE_KEYS) or not hasattr(mcfg, "to_dict"):
        return None
    return type(mcfg).from_dict({k: v for k, v in mcfg.to_dict().items() if k != "quantization_config"})


def _estimated(cfg: Config, option: Option, sizes: Sizes | None, gpus: int, mcfg: PretrainedConfig | None = None,
               kernels: Kernels | None = None, dtypes: Dtypes | None = None) -> Option:
    trial = replace(cfg, train=replace(cfg.train, micro_batch_size=option.micro_batch_size,
                                       grad_accum=option.grad_accum,
                                       gradient_checkpointing=option.gradient_checkpointing,
                                       offload_activations=option.offload_activations))
    est = memory.estimate(trial, None if sizes is None else sizes[:option.micro_batch_size], gpus, mcfg, kernels,
                          dtypes)
    return replace(option, peak=est.peak + est.cuda_context, host=est.host)


def free_memory(device: str) -> float:
    """Bytes this run can use on the GPU: free now plus what this process's allocator already holds (a model
    loaded before the plan is made is counted by the estimate, so its memory is given back here); over several
    processes, the least any of them has."""
    index = torch.device(device).index
    free, _ = torch.cuda.mem_get_info(index)
    free = float(free + torch.cuda.memory_reserved(index))
    # several processes: every rank must train the same split, the one the fullest GPU allows
    return -distributed.all_max([-free], device)[0] if distributed.active() else free


def split(cfg: Config, device: str, free: float | None = None, sizes: Sizes | None = None, gpus: int = 1,
          model: torch.nn.Module | None = None, kernels: Kernels | None = None, dtypes: Dtypes | None = None) -> Split:
    """The split this config trains with on `device`: as stated, or chosen (choose) when auto."""
    return choose(cfg, device, free, sizes, gpus, model, kernels, dtypes) if is_auto(cfg.train) else fixed(cfg)


def resolve(cfg: Config, device: str, log: Callable[[str], None] = print, free: float | None = None,
            sizes: Sizes | None = None, gpus: int = 1, model: torch.nn.Module | None = None) -> Config:
    """cfg with every auto of the split replaced by numbers; a chosen split is printed (Split.describe)."""
    tc = cfg.train
    if AUTO not in (tc.batch_size, tc.micro_batch_size, tc.grad_accum):
        return cfg
    chosen = split(cfg, device, free, sizes, gpus, model)
    if is_auto(tc):
        log(chosen.describe())
    return chosen.apply(cfg)


def for_print(cfg: Config) -> tuple[Config, str]:
    """`train --print-config`: cfg with the split the run would train with where the config and this machine
    decide it without the model, the data or the GPU, and a note on how it was decided ("" when stated).

    An auto split on the CPU is the CPU's rule; on a GPU it stays auto (the run fits it to the GPU memory free
    when it starts and to the longest records), and the note says so.
    """
    tc = cfg.train
    if AUTO not in (tc.batch_size, tc.micro_batch_size, tc.grad_accum):
        return cfg, ""
    if not is_auto(tc):
        keys = ("batch_size", "micro_batch_size", "grad_accum")
        auto = ", ".join(f"train.{k}" for k in keys if getattr(tc, k) == AUTO)
        return fixed(cfg).apply(cfg), f"{auto} auto in the config: follows from the others (batch_size = " \
                                      "micro_batch_size x grad_accum)"
    device = pick_device(tc.device) if tc.device == "auto" else tc.device  # cuda without a GPU: the run says so
    head = f"train.micro_batch_size and train.grad_accum are auto in the config; train.device={tc.device}"
    if not device.startswith("cuda"):
        chosen = on_cpu(cfg)
        return chosen.apply(cfg), f"{head} runs on the CPU, so this is the split the run uses:\n{chosen.describe()}"
    ck, off = _mode(cfg)
    mode = ("without checkpointing" if not ck else "with checkpointing" if not off
            else "with checkpointing and the layer inputs offloaded")
    batch = records_per_step(tc)
    return replace(cfg, train=replace(tc, batch_size=batch)), (
        f"{head} runs on {device}, so the split of the {batch} records a step is chosen when the run starts: the "
        f"fewest micro-batches whose predicted peak (from model.path's config.json and the longest training "
        f"records) fits the GPU memory free then, less {MARGIN:.0%}, {mode}; `slimtune estimate CONFIG` prints "
        "the split this GPU allows now")
