"""`slimtune estimate`: predicted peak GPU memory of a config, by component, and what fits a budget."""
from __future__ import annotations

import argparse

from .. import models
from ..config import Config
from ..engine import memory, run_plan, split
from ..engine.memory import Estimate
from .options import allow_code, config_from


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    allow_code(args, cfg)
    budget = memory.parse_size(args.budget) if args.budget else None
    sizes = split.record_sizes(cfg, models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)) \
        if cfg.data.train else None
    n = args.gpus or cfg.train.gpus
    auto = split.is_auto(cfg.train)
    plan = run_plan.for_estimate(cfg, budget, sizes, n)  # the plan train would start with, printed
    print(plan.describe())
    cfg = plan.apply(cfg)
    rows = sizes[:cfg.train.micro_batch_size] if sizes else None
    est = memory.estimate(cfg, rows, n, kernels=plan.kernels, dtypes=plan.precision)
    where = f"the longest {len(rows)} records of {cfg.data.train}" if rows else \
        f"{cfg.train.micro_batch_size} x {cfg.data.max_len} tokens (no data given: worst case)"
    print(f"slimtune estimate: {cfg.method.name}, {plan.precision.name}, micro-batch {where}, "
          f"checkpointing {'on' if plan.checkpointing else 'off'}")
    print(est.table())
    quick = memory.faster(cfg, rows, plan.kernels, plan.precision) if n <= 1 and not auto else None  # auto weighed it
    if quick and (budget is None or quick[1] <= budget):
        print(f"faster on a GPU, same records per step: {quick[0]} (predicted {quick[1] / memory.GIB:.2f} GiB "
              "with the CUDA context)")
    if budget is None:
        return 0
    return _verdict(cfg, est, budget, rows, plan)


def _verdict(cfg: Config, est: Estimate, budget: float, rows: list[tuple[int, int]] | None,
             plan: run_plan.RunPlan) -> int:
    """Whether the run fits `budget` (bytes) and, when not, the single changes that would: 1 if none does."""
    total = est.peak + est.cuda_context
    print(memory.verdict_line(est, budget))
    if total <= budget:
        return 0
    fixes = memory.suggestions(cfg, budget, rows, plan.kernels)
    print("changes that fit:" if fixes else "no single change fits; combine them or use a larger GPU")
    for text, peak in sorted(fixes, key=lambda x: -x[1]):
        print(f"  {text:<50} {peak / memory.GIB:8.2f} GiB")
    return 0 if fixes else 1
