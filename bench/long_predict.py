"""bench/long_context.py's lengths to try: slimtune's memory estimator asked for the longest record that fits a cap,
and the time guard that keeps one training step within a limit.

The estimate (slimtune.engine.memory.estimate) is not monotonic in the record's length: past select.TILE_TOKENS
(24,576) tokens the MLP runs in slices (train.tiled_mlp auto), so 25,600 tokens predict less than 24,576. The search
therefore checks every length of a grid rather than stopping at the first that does not fit.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [p for p in (str(HERE.parent), str(HERE / "peers")) if p not in sys.path]
GIB = 2**30
START = 16384  # every search starts here (tokens/s is timed at this length)
GRID = 1024  # lengths tried are multiples of this
PROMPT = 64  # masked tokens of each record (long_context._record)
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STRETCH = 1.25  # a length projected to fit the time limit is tried only if this much longer than the last

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from slimtune.config import Config


def slimtune_config(method: str, r: int, max_len: int) -> Config:
    """What `slimtune train` runs for one long record: micro_batch_size 1, gradient checkpointing with layer
    inputs offloaded to CPU memory, bf16, LoRA/QLoRA of rank r on the seven projections."""
    from slimtune import config as config_mod

    return config_mod.from_dict({
        "method": {"name": method, "r": r, "alpha": r, "dropout": 0.0, "target_modules": ALL_LINEAR},
        "train": {"micro_batch_size": 1, "grad_accum": 1, "lr": 1e-4, "precision": "bf16", "max_steps": 100,
                  "gradient_checkpointing": True, "offload_activations": True, "seed": 0},
        "data": {"max_len": max_len}})


def model_config(model_dir: str, size: str) -> PretrainedConfig:
    """The model folder's config.json where it exists, else the shape of bench/peers/seed_recipe.py SIZES."""
    if Path(model_dir, "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_dir)
    import seed_recipe

    return seed_recipe.model_config(size, max_position_embeddings=1 << 20)


def peak_bytes(method: str, r: int, n: int, mcfg: PretrainedConfig) -> float:
    """The estimator's reserved peak (without the CUDA context) for one record of n tokens."""
    from slimtune.engine import memory

    return memory.estimate(slimtune_config(method, r, n), rows=[(n, n - PROMPT)], mcfg=mcfg).peak


def budget_bytes(cap_gib: float, gpu_gib: float) -> float:
    """What the allocator may reserve: the cap (set_per_process_memory_fraction bounds reserved memory), or, for no
    cap or one of the whole GPU or more, its memory less the CUDA context (driver and kernels, outside the
    allocator)."""
    from slimtune.engine import memory

    return cap_gib * GIB if 0 < cap_gib < gpu_gib else gpu_gib * GIB - memory.CUDA_CONTEXT


def longest(fits: Callable[[int], bool], resolution: int, top: int, start: int = START) -> int:
    """The longest length on the grid that fits: every start + k * resolution up to top, then each multiple of GRID
    in the step above the longest of those. 0 when none does."""
    step = max(GRID, resolution // GRID * GRID)
    coarse = [n for n in range(start, top + 1, step) if fits(n)]
    if not coarse:
        return 0
    fine = [n for n in range(coarse[-1] + GRID, min(coarse[-1] + step, top + 1), GRID) if fits(n)]
    return (fine or coarse)[-1]


def predict(method: str, r: int, cap_gib: float, gpu_gib: float, mcfg: PretrainedConfig, resolution: int,
            top: int = 0, host_gib: float = 0.0) -> tuple[int, float]:
    """(the longest record predicted to fit, its predicted peak in GiB); lengths up to top (default: the model's
    max_position_embeddings, at most 2**20). host_gib > 0: the offloaded layer inputs must also fit that much CPU
    memory less the run plan's margin (engine/split.MARGIN; a whole-GPU 8B cell's estimate passes a 128 GiB host, and
    the process was killed there)."""
    from slimtune.engine.split import MARGIN

    top = top or min(getattr(mcfg, "max_position_embeddings", 0) or 1 << 20, 1 << 20)
    room = budget_bytes(cap_gib, gpu_gib)
    host = host_gib * (1 - MARGIN) if host_gib > 0 else float("inf")
    n = longest(lambda m: offloaded_gib(m, mcfg) <= host and peak_bytes(method, r, m, mcfg) <= room, resolution, top)
    return n, round(peak_bytes(method, r, n, mcfg) / GIB, 2) if n else 0.0


def offloaded_gib(n: int, mcfg: PretrainedConfig) -> float:
    """CPU memory the offloaded layer inputs of one record of n tokens take (bf16, every layer): the estimate counts
    none of it on the GPU, and past ~400k tokens of an 8B model it passes a 128 GiB host."""
    return round(n * mcfg.num_hidden_layers * mcfg.hidden_size * 2 / GIB, 1)


def near(predicted: int, resolution: int, start: int = START) -> list[int]:
    """The lengths tried around a prediction, ascending: start (timed), then predicted - resolution, predicted,
    predicted + resolution on the GRID, each above start."""
    around = {(predicted + d) // GRID * GRID for d in (-resolution, 0, resolution)}
    return [start] + sorted(n for n in around if n > start)


def projected_s(t: float, n: int, n_next: int) -> float:
    """Seconds one step at n_next tokens takes if a step at n took t: attention's cost grows with the square of
    the length (an over-estimate where the linear layers dominate, so the guard errs on the side of stopping)."""
    return t * (n_next / n) ** 2


def stretch(t: float, n: int, limit: float) -> int:
    """The longest length on the GRID projected to train within limit seconds, if STRETCH times n or more, else 0."""
    m = int(n * math.sqrt(limit / t)) // GRID * GRID if t > 0 and limit > 0 else 0
    return m if m >= STRETCH * n else 0
