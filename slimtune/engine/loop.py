"""The training loop, in plain PyTorch: shuffled micro-batches, gradient accumulation, AdamW, schedule,
numeric guards, checkpoints that resume exactly, and logs."""
from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from ..config import Config
from ..data import pack
from ..data.encode import Encoded
from ..data.readers import DataError
from ..data.stream import MicroBatches, collate_micro, counts, fingerprint, micro_batches, share, total_steps
from ..kernels import attention
from ..kernels.select import disable as disable_kernels, enable as enable_kernels
from ..runs import checkpoint
from ..runs.metrics_log import NullLog, RunLog, eval_line, memory_gib, progress, step_line, summary_line
from . import distributed, guards, precision, run_plan, timing
from .optim import build_optimizer, build_scheduler
from .recompute import match_checkpointing
from .state import Run, Tally, result
from .step import Context, accumulate, forward_context, step, trained_tokens  # noqa: F401 (the engine's API)

if TYPE_CHECKING:
    from .preference_step import PairObjective

Log = Callable[[str], None]
Evaluate = Callable[[torch.nn.Module, Context, int], Any]  # (model, context, step) -> evaluate.report.Report
Measure = Callable[[int], Any]  # step -> the held-out scores, logged


def fit(model: torch.nn.Module, train: list[Encoded], held: list[Encoded], cfg: Config, pad: int, out_dir: str | Path,
        device: str, log: Log = print, show_progress: bool = True, plan: run_plan.RunPlan | None = None,
        resume: Path | None = None, evaluate: Evaluate | None = None, objective: PairObjective | None = None) -> dict:
    """Train for the configured steps, from the checkpoint folder `resume` when given; eval before
    (optionally), every train.eval_every steps and after. Metrics go to metrics.jsonl and TensorBoard,
    checkpoints to out_dir/checkpoints, the final eval to out_dir/eval. SIGINT/SIGTERM/SIGHUP save a checkpoint
    and return early, with result["interrupted"] set.

    Args:
        plan: the run plan (engine/run_plan.py); None: resolved here for this model, and printed.
        evaluate: (model, context, step) -> Report on the held-out split `held` (evaluate.report.in_training,
            which can also generate; evaluate.perplexity.loss_eval for the loss alone); needed when `held`
            holds records.
        objective: a preference objective (engine/preference_step.PairObjective) that trains on `train`, its
            records (preference_step.items), in place of the answers' next-token loss.
    """
    if held and evaluate is None:  # the loop imports no evaluation: the caller says how to score `held`
        raise ValueError("fit: held-out records need an evaluate callable (evaluate.perplexity.loss_eval scores "
                         "their loss)")
    if plan is None:
        plan = run_plan.resolve(cfg, device, model=model)
        log(plan.describe())
    cfg, dtypes = plan.apply(cfg), plan.precision
    tc = cfg.train
    match_checkpointing(model, plan.checkpointing, cfg.method, log)  # prepare may have run without the plan
    if note := precision.cpu_note(dtypes, device):
        log(note)
    torch.manual_seed(tc.seed)
    took = enable_kernels(model, tc, device, log, plan.kernels)
    stream = (objective.stream(train, tc, took.packing) if objective
              else micro_batches(train, tc, cfg.data.max_len, took.packing))
    steps = total_steps(len(train), tc, stream.per_epoch() if stream.binned else 0)
    optimizer = build_optimizer(model, tc)
    run = Run(model, cfg, dtypes, device, Path(out_dir), steps, optimizer, build_scheduler(optimizer, steps, tc),
              precision.scaler(dtypes, device), stream, (objective.fingerprint if objective else fingerprint)(train),
              took, Tally(start_max_abs=guards.trainable_max(model)), objective=objective)  # a resume keeps the first
    if stream.packed:
        log(_describe_packing(stream, device, dtypes, model))
    rows = plan.micro_batch_size * (2 if objective else 1)  # a preference record is two rows
    context = forward_context(dtypes, device, plan.offload, model, rows * cfg.data.max_len)
    if objective:  # its reference, from the model as loaded: before a resume puts trained weights in
        objective.start(model, {"train": train, "eval": held}, run.out_dir, device, tc.micro_batch_size, context, log,
                        plan=plan)
    offset = _restore(run, resume, log) if resume else None
    logs = RunLog(run.out_dir, truncate_to=offset, purge_step=run.step + 1 if resume else None, log=log) \
        if distributed.is_main() else NullLog()
    show_progress = show_progress and distributed.is_main()
    measure = functools.partial(_evaluate, run, context, logs, evaluate) if held else None
    try:
        if measure and tc.eval_at_start and not resume:
            run.tally.eval_before = measure(0).row()
            log(f"eval before training: {eval_line(run.tally.eval_before)}")
        _train(run, pad, context, logs, log, show_progress, measure)
        if not run.end.interrupted:
            _finish(run, measure, logs, log)
    finally:
        logs.close()
        disable_kernels(model)
    return _result(run, log)


def _result(run: Run, log: Log) -> dict:
    """The returned record (put together in one place), and its summary lines."""
    done = result(run)
    if not run.end.interrupted and distributed.is_main():
        log(summary_line(done))
        if stalled := timing.summary_line(done):
            log(stalled)
    return done


def _train(run: Run, pad: int, context: Context, logs: RunLog, log: Log, show_progress: bool,
           measure: Measure | None = None) -> None:
    tc = run.cfg.train
    run.model.train()
    bar = progress(run.steps, show_progress, initial=run.step)
    start = time.perf_counter() - run.elapsed
    profiler = timing.Profiler(tc.profile_step if distributed.is_main() else 0, run.out_dir / "profile.txt",
                               run.device)
    try:
        with checkpoint.StopOnSignal(log) as stop, timing.Pauses(run.device) as pauses:
            while run.step < run.steps:
                host = run.clock.start()
                pauses.read()  # what paused the loop between steps is in host_s
                with profiler.around(run.step + 1):  # its table is written after the step's clock stopped
                    records = [next(run.stream) for _ in range(tc.grad_accum)]
                    row = _step(run, records, pad, context, log)
                    pauses.settle()  # its first call: this process's first step (a resumed run's too)
                    paused = pauses.read()
                    row.update(step_s=run.clock.stop(run.step, row.pop("computed_tokens"), paused), host_s=host,
                               **paused)
                run.elapsed = time.perf_counter() - start
                _report(run, row, logs, bar, log)
                _maybe_eval(run, measure, log)  # before the save: the checkpoint's metrics hold its row
                if (tc.save_every and run.step % tc.save_every == 0) or run.step == run.steps or stop.requested:
                    _save(run, logs)
                if stop.requested:
                    run.end.interrupted, run.end.stopped_at = stop.requested, run.step
                    break
    finally:
        profiler.finish()  # a run that ended inside the profiled steps still writes its table
        bar.close()


def _step(run: Run, records: list[list[Encoded]], pad: int, context: Context, log: Log) -> dict:
    """One guarded optimizer step: an all-masked batch or a NaN/inf is an error naming step and records."""
    tc = run.cfg.train
    wheres = [r.where for rs in records for r in rs]
    row = run.objective.step(run, records, context) if run.objective else _answers_step(run, records, pad, context,
                                                                                          wheres)
    run.step += 1
    bad = row.pop("nonfinite", None)
    if bad:
        value = row["loss"] if bad == "loss" else row["grad_norm"]
        start = run.tally.start_max_abs
        cause = guards.likely_cause(bad, run.model, run.dtypes.name, tc.lr, run.losses, start)
        text = guards.message(bad, run.step, value, wheres, cause)
        if tc.on_nan == "stop":
            raise guards.NumericError(f"{text} Stopped before applying this update (train.on_nan=stop); "
                                      + guards.resume_advice(run.out_dir, start, cause.startswith("training diverged")))
        run.tally.nan_steps += 1
        row["nan_skipped"] = True
        log(f"warning: {text} Skipped this update (train.on_nan=skip).")
    else:
        run.losses = (run.losses + [row["loss"]])[-20:]
    run.tally.skipped_steps += int(row.pop("skipped", False))
    return row


def _answers_step(run: Run, records: list[list[Encoded]], pad: int, context, wheres: list[str]) -> dict:
    """Collate, forward, backward and update on the answers' next-token loss."""
    rank, world = distributed.rank(), distributed.size()
    began = time.perf_counter()
    batches = [collate_micro(share(rs, rank, world), run.stream.packed, pad, run.device) for rs in records]
    data_s = time.perf_counter() - began
    # counted from the records over every rank's share, on the host: nothing waits on the device (the
    # previous step's update) before this step's first kernel is queued, and no collective is needed
    n_tokens, seen = (sum(c) for c in zip(*(counts(rs, world) for rs in records)))
    run.seen += seen
    try:
        row = step(run.model, batches, run.optimizer, run.scheduler, run.cfg.train.max_grad_norm, context,
                   run.scaler, guard=True, chunked=run.kernels.chunked_loss, n_tokens=n_tokens)
    except DataError:
        raise DataError(f"step {run.step + 1}: every label in this step's batch is -100, nothing to train on "
                        f"(records {', '.join(wheres)}); each record needs an answer token after its first "
                        "position within data.max_len") from None
    row["data_s"] = data_s
    row["computed_tokens"] = sum(b["input_ids"].numel() for b in batches)  # padding too: what the step computed
    return row


def _describe_packing(stream: MicroBatches, device: str, plan: precision.Dtypes, model: torch.nn.Module) -> str:
    lengths = [len(r.input_ids) for r in stream.records]
    fast = device.startswith("cuda") and attention.varlen_available() and plan.name != "fp32"
    rows = (f"{stream.size} records per row" if stream.rows else
            f"{len(lengths)} records in {stream.per_epoch()} rows of at most {stream.budget} tokens "
            f"({100 * pack.fill(lengths, stream.order, stream.budget):.1f}% full)")
    return (f"packing: {rows}; attention within each record: "
            + ("varlen flash attention" + attention.heads_note(model) if fast else
               "one SDPA call per record (plain PyTorch)"))


def _report(run: Run, row: dict, logs: RunLog, bar: tqdm, log: Log = print) -> None:
    """metrics.jsonl + TensorBoard every log_every steps (and, with the bar off, a printed line); the bar's
    postfix every step."""
    run.trained += row["trained_tokens"]
    seconds = max(run.elapsed, 1e-9)
    row.update(step=run.step, lr=run.scheduler.get_last_lr()[0], input_tokens_per_s=run.seen / seconds,
               trained_tokens_per_s=run.trained / seconds, elapsed_s=run.elapsed)
    if run.dtypes.scaler:
        row["skipped_steps"] = run.tally.skipped_steps  # each one an fp16 overflow
    mem_key, mem = memory_gib(run.device)
    row[mem_key] = mem
    if run.step % run.cfg.train.log_every == 0 or run.step == run.steps:
        logs.write(**row)
        if bar.disable:  # --no-progress: logs only, so the log says how the run goes
            log(step_line(row, run.steps))
    post = dict(loss=f"{row['loss']:.4f}", tok_s=f"{row['input_tokens_per_s']:.0f}", mem=f"{mem:.1f}G")
    if run.dtypes.scaler:
        post["scale"] = f"{row['loss_scale']:.0f}"
    bar.set_postfix(**post, refresh=False)
    bar.update(1)
    run.tally.train_loss = row["loss"]


def _evaluate(run: Run, context: Context, logs: RunLog, hook: Evaluate, at: int) -> Any:
    """Held-out scores at step `at` (the hook's Report), logged as eval_* keys. The RNG streams training draws
    from (dropout masks, shuffles) are put back as they were, so a run trains on the same numbers whether it
    evaluates or not, and a resumed run as the uninterrupted one."""
    rng, was_training = checkpoint.rng_state(), run.model.training
    try:
        report = hook(run.model, context, at)
    finally:
        checkpoint.set_rng_state(rng)
        run.model.train(was_training)
    logs.write(step=at, **report.row())
    return report


def _maybe_eval(run: Run, measure: Measure | None, log: Log) -> None:
    """Every train.eval_every steps; the last step's eval is _finish's."""
    every = run.cfg.train.eval_every
    if measure and every and run.step % every == 0 and run.step < run.steps:
        log(f"eval at step {run.step} of {run.steps}: {eval_line(measure(run.step).row())}")


def _save(run: Run, logs: RunLog) -> Path:
    """A checkpoint in the single-process format whatever the number of ranks: sharded tensors are
    gathered whole (every rank takes part), rank 0 writes, the others wait for it. Full fine-tuning on
    several ranks is the exception: each rank writes its own DCP shard (checkpoint.save_sharded)."""
    tc = run.cfg.train
    broken = [n for n, p in run.model.named_parameters()
              if p.requires_grad and not bool(torch.isfinite(guards.local(p)).all())]
    if distributed.active() and distributed.all_sum([len(broken)], run.device)[0] and not broken:
        broken = ["(on another rank)"]
    if broken:  # an update made them so: a checkpoint of them would only be resumed into the same NaNs
        raise guards.NumericError(f"step {run.step}: the trained weight {broken[0]} holds NaN/inf ({len(broken)} "
                                  "tensors do), so no checkpoint or adapter was written; "
                                  + guards.resume_advice(run.out_dir, run.tally.start_max_abs, True))
    state = {"step": run.step, "seen": run.seen, "elapsed": run.elapsed, "result": run.tally.state_dict(),
             "scheduler": run.scheduler.state_dict(),
             "scaler": run.scaler.state_dict(), "stream": run.stream.state_dict(), "data": run.data,
             **checkpoint.rng_states(), "metrics_bytes": logs.offset(), "trained": run.trained}
    if checkpoint.writes_sharded(run.cfg):  # each rank writes its shard: nothing gathered
        return checkpoint.save_sharded(run.out_dir, run.step, run.model, run.optimizer, run.cfg, state,
                                       tc.keep_checkpoints)
    state["optimizer"] = distributed.optimizer_state(run.optimizer) if distributed.active() \
        else run.optimizer.state_dict()
    with distributed.gathered(run.model) as weights:
        path = checkpoint.save(run.out_dir, run.step, run.model, run.cfg, state, tc.keep_checkpoints, weights) \
            if distributed.is_main() else checkpoint.step_folder(run.out_dir, run.step)
    distributed.barrier()
    return path


def _restore(run: Run, folder: Path, log: Log) -> int:
    """Load a checkpoint into the run; returns the metrics.jsonl length to cut back to."""
    state = checkpoint.load(folder, run.model, run.optimizer)
    if state["data"] != run.data:
        raise DataError(f"{folder}: the training data differ from those it was trained on ({state['data']['records']} "
                        f"encoded records then, {run.data['records']} now, or other content); resume with the same "
                        "data and data.* settings, or start a new run")
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.stream.load_state_dict(state["stream"])
    run.step, run.seen, run.elapsed = state["step"], state["seen"], state["elapsed"]
    run.trained = state.get("trained", 0)  # checkpoints before trained_tokens_per_s lack it
    run.tally.load_state_dict(state["result"])  # the kernels stay this run's choice (FREE_KEYS may change them)
    _new_peak_lr(run, log)
    checkpoint.resume_rng(state)  # last: each rank's dropout masks go on as in the uninterrupted run
    log(f"resuming from {folder} at step {run.step} of {run.steps}")
    return state["metrics_bytes"]


def _new_peak_lr(run: Run, log: Log) -> None:
    """A resume may change train.lr (checkpoint.FREE_KEYS, so a diverged run can go on more gently): the
    restored optimizer and schedule hold the old peak, so the schedule goes on from this step at the new one."""
    lr, sched = run.cfg.train.lr, run.scheduler
    old = sched.base_lrs[0]
    if lr == old:
        return
    sched.base_lrs = [lr] * len(sched.base_lrs)
    for group, rule in zip(run.optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * rule(sched.last_epoch)
    log(f"train.lr is {lr:g} now ({old:g} in the checkpoint): the schedule goes on from step {run.step} at the new "
        "peak")


def _finish(run: Run, measure: Measure | None, logs: RunLog, log: Log) -> None:
    t, end = run.tally, run.end
    if run.dtypes.scaler:
        log(f"fp16 loss scaling: final scale {run.scaler.get_scale():.0f}, {t.skipped_steps} of {run.steps} "
            "steps skipped for overflow")
    if t.nan_steps:
        log(f"train.on_nan=skip: {t.nan_steps} of {run.steps} steps skipped for a NaN/inf loss or gradient")
    if run.device.startswith("cuda"):
        end.peak_allocated_gib = torch.cuda.max_memory_allocated() / 2**30
        end.peak_reserved_gib = torch.cuda.max_memory_reserved() / 2**30
    guards.final_checks(run)
    if uniform := guards.uniform(run.model, t.train_loss):
        log(uniform)
    if measure:
        report = measure(run.steps)
        end.eval_after = report.row()
        before = (t.eval_before or {}).get("eval_loss")
        change = f" (loss before: {before:.4f}, {100 * (end.eval_after['eval_loss'] / before - 1):+.1f}%)" \
            if before else ""
        log(f"eval after training: {eval_line(end.eval_after)}{change}")
        report.scores["step"] = run.steps
        if not distributed.is_main():
            return
        (run.out_dir / "eval" / "predictions.jsonl").unlink(missing_ok=True)  # a resumed run's, if it generated
        out = report.write(run.out_dir / "eval")
        end.eval_dir = str(out)
        log(f"wrote {out / 'scores.json'}" + (" and predictions.jsonl" if report.predictions else ""))
        if not math.isfinite(end.eval_after["eval_loss"]):
            raise guards.NumericError(f"the held-out loss after training is {end.eval_after['eval_loss']} (not "
                                      f"finite; {out / 'scores.json'} says why), so the adapter was not saved")
