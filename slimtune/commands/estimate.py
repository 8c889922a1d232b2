"""`slimtune estimate`: predicted peak GPU memory of a config, by component, and what fits a budget. The data are
read as train.objective reads them and the prediction is the one `slimtune train` prints before its model loads
(engine/preflight.py); for grpo, the line its run logs when the first step starts."""
from __future__ import annotations

import argparse

from .. import models
from ..config import Config
from ..data.preference import PAIRED
from ..engine import grpo_step, memory, preflight, run_plan, split
from ..engine.memory import Estimate
from .options import allow_code, config_from


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    allow_code(args, cfg)
    budget = memory.parse_size(args.budget) if args.budget else None
    grpo = cfg.train.objective == "grpo"
    n = args.gpus or cfg.train.gpus
    if grpo:  # as train: a micro-batch of one prompt's G completions (per process) unless the config sets it
        cfg = grpo_step.one_prompt_per_micro_batch(cfg, world=n)
        if n > 1:  # what train refuses on n processes, refused here in its words
            grpo_step.check_processes(cfg, n)
    built = _records(cfg) if cfg.data.train else None  # read as the run's objective reads them
    sizes = preflight.sizes(built) if built else None
    auto = split.is_auto(cfg.train)
    plan = run_plan.for_estimate(cfg, budget, sizes, n)  # the plan train would start with, printed
    print(plan.describe())
    cfg = plan.apply(cfg)
    if grpo:
        return _grpo(cfg, plan, built, budget)
    rows = sizes[:cfg.train.micro_batch_size] if sizes else None
    est = preflight.predict(cfg, plan, sizes)  # the prediction train prints before the model loads
    records = "pairs" if cfg.train.objective in PAIRED else "records"
    where = f"the longest {len(rows)} {records} of {cfg.data.train}" if rows else \
        f"{cfg.train.micro_batch_size} x {cfg.data.max_len} tokens (no data given: worst case)"
    print(_header(cfg, plan, where))
    print(est.table())
    quick = memory.faster(cfg, rows, plan.kernels, plan.precision) if n <= 1 and not auto else None  # auto weighed it
    if quick and (budget is None or quick[1] <= budget):
        print(f"faster on a GPU, same records per step: {quick[0]} (predicted {quick[1] / memory.GIB:.2f} GiB "
              "with the CUDA context)")
    if budget is None:
        return 0
    return _verdict(cfg, est, budget, rows, plan)


def _records(cfg: Config) -> preflight.Records:
    """data.train as `slimtune train` reads it for train.objective; a bad record stops here in train's words."""
    tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    return preflight.records(cfg, tokenizer, lambda _: None, preflight.answers_needed(cfg.grpo))


def _header(cfg: Config, plan: run_plan.RunPlan, where: str) -> str:
    objective = "" if cfg.train.objective == "sft" else f"{cfg.train.objective}, "
    return (f"slimtune estimate: {objective}{cfg.method.name}, {plan.precision.name}, micro-batch {where}, "
            f"checkpointing {'on' if plan.checkpointing else 'off'}")


def _grpo(cfg: Config, plan: run_plan.RunPlan, built: preflight.Records | None, budget: float | None) -> int:
    """GRPO's estimate as the run logs it when it starts (engine/grpo_memory.py: the KV cache of sampling G
    completions of a micro-batch's prompts, the training pass over them as memory.estimate counts a micro-batch,
    the optimizer state), for the longest prompts of data.train (without data: prompts of data.max_len tokens)."""
    prompts = built.train if built else preflight.worst_prompt(cfg)
    est, line = preflight.grpo_predict(preflight.meta_model(cfg, plan), plan, prompts, cfg)
    print(_header(cfg, plan, f"{cfg.train.micro_batch_size} prompt(s) x {cfg.grpo.num_generations} completions"))
    print(line)
    if budget is None:
        return 0
    fits, verdict = preflight.grpo_verdict(est, budget)
    print(verdict)
    return 0 if fits else 1


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
