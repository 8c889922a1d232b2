"""A training run, top to bottom: config -> tokenizer -> data -> model -> method -> fit -> save."""
from __future__ import annotations

import contextlib
import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import config as config_mod
from . import methods, models, outputs
from .config import Config, ConfigError, batch
from .data import Built
from .data.collate import pad_id
from .engine import grpo_step, host_memory, memory, precision, preference_step, preflight, run_plan, split
from .engine import reference as pref_reference
from .engine.distributed import Processes
from .engine.loop import fit
from .engine.memory import GIB
from .engine.precision import base_dtype_name
from .engine.recompute import drop_input_grads, enable_checkpointing
from .engine.run_plan import RunPlan
from .runs import checkpoint, ownership as runfolder
from .runs.ownership import RunFolderError
from .errors import ExistingFileError, MissingFileError
from .data.pairs import BuiltPairs
from .evaluate import preference as pref_eval, summary
from .evaluate.report import in_training
from .methods.parts import PARTS
from .kernels import select
from .kernels.select import Kernels
from .runs.adapter import read_config, save
from .methods import experts, lora
from .methods.heads import describe_parameters, warn_frozen
from .methods.quant import check_base, load_base, quantization_config
from .objectives import rewards as rewards_mod

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Log = Callable[[str], None]


def _check_output(out: Path, cfg: Config, overwrite: bool, resume: bool, keep: list[Path],
                  log: Log = print) -> tuple[Path | None, dict | None]:
    """(the checkpoint to resume from, or None for a fresh run; the manifest of the run whose own files a
    fresh start removes). Refuses, before anything is loaded, to mix two runs in one folder or to touch a
    folder slimtune did not write: a folder holding files needs --overwrite, or --resume with the same config."""
    names = runfolder.entries(out)
    manifest = runfolder.read_manifest(out) if names else None
    if not names or (manifest is not None and names <= runfolder.STARTED):  # nothing, or a run stopped before step 1
        if resume:
            log(f"nothing to resume in {out}: starting a new run")
        return None, manifest
    if resume:
        return _resume_from(out, cfg, manifest is not None), manifest
    if manifest is None:
        raise ExistingFileError(f"train.output_dir: {out} already holds files that are not a slimtune run (no "
                                f"{runfolder.MANIFEST}); slimtune deletes only what it wrote: choose another folder")
    if overwrite:
        runfolder.doomed(out, manifest, keep)  # refuses here, before anything loads, to remove what the run reads
        return None, manifest
    raise ExistingFileError(f"train.output_dir: {out} already holds files; choose another folder, pass "
                            "--resume to continue that run, or --overwrite to replace it (only slimtune's own files "
                            "are removed)")


def _resume_from(out: Path, cfg: Config, marked: bool) -> Path:
    """The newest complete checkpoint, if it was written by this same config; else an error saying why not."""
    last = checkpoint.latest(out)
    instead = "--overwrite to train it again" if marked else "another train.output_dir"
    if last is None and any((out / name).is_file() for name in ("adapter_config.json", PARTS)):
        raise RunFolderError(f"train.output_dir: {out} holds a finished run (its adapter is saved) and no complete "
                             f"checkpoint in {out / checkpoint.ROOT}: there is nothing to resume; use it as it is, "
                             f"or pass {instead}")
    if last is None:
        raise RunFolderError(f"train.output_dir: {out} has no complete checkpoint in {out / checkpoint.ROOT} to "
                             f"resume from; pass {instead}")
    diff = checkpoint.differences(read_config(last), cfg)
    if diff:
        raise ExistingFileError(f"train.output_dir: {out} holds a different run, which --resume would mix with "
                                "this one: " + "; ".join(diff) + ". Use that run's config, or another folder")
    return last


def _prepare_output(out: Path, cfg: Config, manifest: dict | None, created: bool, protect: list[Path],
                    log: Log) -> None:
    """A fresh run removes what an earlier run wrote here (its own files, never the user's), then marks the
    folder as a run and writes its config.yaml, so a killed run is known for what it is."""
    if manifest is not None:
        gone = runfolder.remove_own(out, manifest, protect)
        if gone:
            log(f"removed the earlier run's {', '.join(gone)} from {out}; other files there were kept")
        created = bool(manifest.get("created_folder"))
    runfolder.write_manifest(out, created, runfolder.entries(out) - {runfolder.MANIFEST})
    (out / "config.yaml").write_text(config_mod.dump(cfg), encoding="utf-8")


def _write_skipped(out: Path, skipped: list[dict], log: Log) -> None:
    path = out / "skipped_records.jsonl"
    path.unlink(missing_ok=True)
    if skipped:
        with path.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(s, default=str) + "\n" for s in skipped)
        log(f"{len(skipped)} records were left out of the run; each, with its reason, is in {path}")


def _check_split(cfg: Config, per_step: int, kept: int, held: int, log: Log) -> None:
    """A held-out split (data.eval_size) that leaves fewer training records than one step takes, where the data
    had enough: refused when data.eval_size asked for every record (1e9 held out 39 of 40 records and trained on
    1, with exit 0), else warned about."""
    size, total = cfg.data.eval_size, kept + held
    if cfg.data.eval or not held or kept >= per_step or total < per_step:
        return
    text = (f"data.eval_size={size:g} holds out {held} of the {total} training records, leaving {kept} to train on, "
            f"fewer than one step's batch (train.batch_size={per_step})")
    if (int(size) if size >= 1 else round(total * size)) < total:
        log(f"warning: {text}: every step trains on the same few records; a smaller data.eval_size trains on more")
        return
    raise ConfigError(f"{text}; set data.eval_size to a fraction below 1 or a count of at most {total - per_step}, "
                      "or give held-out records in data.eval")


def _predict(cfg: Config, plan: RunPlan, sizes: list[tuple[int, int]], log: Log, hint: bool = True) -> float | None:
    """The memory estimate of the plan's worst micro-batch, printed before the model loads; on a GPU, a faster
    split of the same records per step when there is one (memory.faster) and hint is set."""
    worst, cuda = sizes[:plan.micro_batch_size], plan.device.startswith("cuda")
    try:
        est = preflight.predict(cfg, plan, sizes)
        quick = memory.faster(cfg, worst, plan.kernels, plan.precision) if hint and cuda and not plan.fsdp else None
    except Exception as err:  # an estimate must never stop a run: architectures differ in ways it can't see
        log(f"memory estimate unavailable: {err}")
        return None
    per = " per GPU" if plan.fsdp else ""
    if cuda:
        log(f"predicted peak GPU memory{per}: {est.peak / GIB:.2f} GiB (+{est.cuda_context / GIB:.1f} GiB CUDA "
            "context; `slimtune estimate` shows the parts)")
        _host_line(est.host * host_memory.local_processes(), host_memory.available(), log)
    else:  # the estimate counts tensors, which the CPU holds too; the process adds its own memory
        log(f"predicted peak memory of the run's tensors: {est.peak / GIB:.2f} GiB (weights, gradients, optimizer "
            f"state, activations; on the CPU the process adds its own: metrics.jsonl logs its peak as rss_gib)")
    if quick:
        log(f"hint: {quick[0]} trains the same records per step in fewer, larger micro-batches, usually faster "
            f"(predicted {quick[1] / GIB:.2f} GiB with the CUDA context)")
    return est.peak


def _host_line(need: float, have: float | None, log: Log) -> None:
    """The pinned CPU memory offloaded layer inputs take (every process of this machine's), said beside the GPU's
    peak; a warning where it passes what is available (auto keeps them on the GPU then: engine/split.py; this is
    train.offload_activations=true)."""
    if not need:
        return
    log(f"predicted CPU memory for the offloaded layer inputs: {need / GIB:.2f} GiB (pinned)")
    if have is not None and need > have:
        log(f"warning: {have / GIB:.1f} GiB of CPU memory is available, less than the offloaded layer inputs need: "
            "the system may kill the run; set train.offload_activations=false or lower data.max_len")


@dataclass(frozen=True)
class Prepared:
    """A model made ready to train, and what prepare chose on the way."""
    model: torch.nn.Module  # with the method applied (a PeftModel for peft methods)
    dtypes: precision.Dtypes  # dtypes of the base, the trainable weights and autocast; fp16 loss scaling
    kernels: Kernels | None = None  # the fast paths switched on (kernels/select.py); None unless asked


def prepare(model: torch.nn.Module, cfg: Config, device: str = "cpu", log: Log = print, kernels: bool = False,
            heads: tuple[str, ...] = (), plan: RunPlan | None = None) -> Prepared:
    """The one sequence train, the bench scripts and users share: gradient checkpointing, the method
    (seeded with train.seed), trainable weights in the plan's dtype, and with kernels=True the fast paths
    train.* asks for on `device` (fit switches them on itself for its run, and off after; ask for them when
    driving engine steps yourself). plan: the run's (engine/run_plan.py), whose dtypes, checkpointing and
    kernels are used; without one they follow train.* (fit then turns on what its plan adds). Warns when a new
    module (a wrapper's head, or one named in `heads`) stays frozen."""
    dtypes = plan.precision if plan else precision.choose_dtypes(cfg.train.precision, device, cfg.train.adam_eps)
    if plan.checkpointing if plan else cfg.train.gradient_checkpointing:
        enable_checkpointing(model, cfg.method, log)
    torch.manual_seed(cfg.train.seed)  # adapter init (PiSSA's randomized SVD too) is the same on every resume
    model = methods.apply(model, cfg.method)
    drop_input_grads(model)  # peft hooks the embedding output again when it wraps a checkpointed model
    warn_frozen(model, cfg.method.name, heads)
    precision.cast_trainable(model, dtypes.trainable)
    log(f"method {cfg.method.name}: {describe_parameters(model)}")
    if methods.REGISTRY[cfg.method.name] is lora and (moe := experts.report(model, cfg.method.train_router)):
        log(moe)
    took = select.enable(model, cfg.train, device, log, plan.kernels if plan else None) if kernels else None
    return Prepared(model, dtypes, took)


def from_config(cfg: Config, overwrite: bool = False, show_progress: bool = True, log: Log = print,
                resume: bool = False, protect: tuple[str | Path, ...] = (),
                rewards: tuple[rewards_mod.Reward, ...] = ()) -> dict:
    """Train per the config; returns the run summary (losses, steps, timings; "interrupted": the signal's
    name when SIGINT/SIGTERM stopped it). resume (or train.resume=auto) continues from the newest complete
    checkpoint in train.output_dir. protect: files a fresh start must not remove (the config file).
    rewards: train.objective=grpo's rewards written in Python (--reward), beside grpo.rewards' built-ins."""
    if rewards and cfg.train.objective != "grpo":
        raise ConfigError(f"--reward: rewards are read by train.objective=grpo only (it is {cfg.train.objective})")
    if not cfg.data.train:
        raise MissingFileError("data.train: no training data given (set data.train=path/to/data.jsonl)")
    for key, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if path and not Path(path).exists():
            raise MissingFileError(f"{key}: {path} does not exist")
    if overwrite and (resume or cfg.train.resume == "auto"):
        raise ConfigError("--overwrite replaces the run in train.output_dir and --resume (train.resume=auto) "
                          "continues it; choose one")
    out = Path(cfg.train.output_dir)
    outputs.check(out, "train.output_dir", cfg.model.path, [cfg.data.train, cfg.data.eval],
                  files=[name for name in runfolder.WRITES if "*" not in name])
    resume = resume or cfg.train.resume == "auto"
    procs = Processes.start(models.pick_device(cfg.train.device))  # torchrun: this rank's GPU
    log, show_progress = procs.log(log), show_progress and procs.is_main  # rank 0 speaks for the run
    made = runfolder.probe(out) if procs.is_main else []  # a read-only folder or a full disk: one line now
    keep = [Path.cwd(), *(Path(p) for p in (cfg.data.train, cfg.data.eval, *protect) if p)]
    try:
        with runfolder.Lock(out, log) if procs.is_main else contextlib.nullcontext():
            return _run(cfg, out, procs, out in made, keep, overwrite, resume, show_progress, log, tuple(rewards))
    except OSError as err:  # a disk that fills mid-run, a folder made read-only: one line, not a traceback
        nice = runfolder.environment_error(err, out)
        if nice is None:
            raise
        raise nice from err
    finally:
        runfolder.remove_if_empty(made)  # a run stopped by a check leaves no folder behind


def _run(cfg: Config, out: Path, procs: Processes, created: bool, keep: list[Path], overwrite: bool, resume: bool,
         show_progress: bool, log: Log, rewards: tuple[rewards_mod.Reward, ...] = ()) -> dict:
    """The run itself, holding the folder's lock: checks first, then the first write to output_dir."""
    procs.refuse(cfg.method.name)
    procs.barrier()  # rank 0 has probed and locked the folder before every rank looks at it
    start, manifest = _check_output(out, cfg, overwrite, resume, keep, log)
    procs.barrier()  # every rank has looked at the folder before rank 0 writes to it
    quant = quantization_config(cfg.method, cfg.train.precision)  # qlora without CUDA stops here, before anything loads
    if quant is not None:
        check_base(cfg.model.path, cfg.model.trust_remote_code, cfg.method.quant_bits)  # 8-bit qlora of fused experts
    tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    cfg, grpo = _grpo(cfg, tokenizer, rewards, out, start is not None, log)
    objective = grpo or _objective(cfg, pad_id(tokenizer), procs.world_size)  # None for sft; refusals stop here
    # every record is checked before the model is loaded
    built = preflight.records(cfg, tokenizer, log, grpo is not None and grpo_step.needs_answer(grpo))
    auto, sizes = split.is_auto(cfg.train), preflight.sizes(built)
    if start is not None:  # an auto split goes on as the checkpoint's run chose it
        cfg = batch.adopt(read_config(start), cfg)
    plan = run_plan.resolve(cfg, procs.device, sizes=sizes, world_size=procs.world_size, rank=procs.rank)
    _check_split(cfg, plan.batch_size, len(built.train), len(built.eval), log)
    cfg = plan.apply(cfg)
    log(plan.describe())
    predicted = None if grpo else _predict(cfg, plan, sizes, log, hint=not auto)  # GRPO: its own, in fit
    if plan.device == "cpu" and not objective:  # before the load: a record too long for this machine is one line
        host_memory.check(cfg, built.train, built.eval)
    model, _ = load_base(cfg.model.path, base_dtype_name(cfg, plan.device, plan.precision),
                         cfg.model.trust_remote_code, procs.load_device, quant)
    model = procs.shard(prepare(model, cfg, plan.device, log, plan=plan).model, cfg.train, log)
    train, held, hook = _records(cfg, built, objective, tokenizer, plan, show_progress, log)
    if procs.is_main:  # every check has passed: only now does output_dir get its first file
        _start_folder(out, cfg, built, start, manifest, created, keep, log)
    procs.barrier()
    result = fit(model, train, held, cfg, pad_id(tokenizer), out, plan.device, log, show_progress, plan,
                 resume=start, evaluate=hook, objective=objective)
    if result.get("interrupted"):
        log(f"{result['interrupted']}: stopped after step {result['stopped_at']} of {result['steps']}; checkpoint "
            f"{checkpoint.latest(out)}; `slimtune train CONFIG --resume` goes on from there")
        return dict(result, output_dir=str(out))
    _compare_memory(result, predicted, log)
    return _save(model, cfg, out, procs, result, log)


def _objective(cfg: Config, pad: int, world_size: int) -> preference_step.PairObjective | None:
    """The preference objective's step for train.objective (None for sft), its reference resolved."""
    if cfg.train.objective in ("sft", "grpo"):
        return None
    preference_step.check(cfg, world_size)
    return preference_step.PairObjective(cfg.train.objective, cfg.preference, pref_reference.resolve(cfg), pad)


def _records(cfg: Config, built: Built | BuiltPairs,
             objective: preference_step.PairObjective | grpo_step.GrpoObjective | None,
             tokenizer: PreTrainedTokenizerBase, plan: RunPlan, show_progress: bool,
             log: Log) -> tuple[list, list, Callable | None]:
    """(training records, held-out records, the evaluate hook fit calls, None without held-out records) as fit
    takes them: encoded answers, or a preference objective's items."""
    if objective is None:
        hook = in_training(tokenizer, cfg, built.eval_examples, built.eval, plan.device, show_progress, built.train,
                           log, chunked=plan.chunked_loss) if built.eval else None
        return built.train, built.eval, hook
    if not isinstance(objective, preference_step.PairObjective):  # grpo: its prompts, no held-out evaluation
        return built.train, [], None
    train = preference_step.items(built.train, objective.objective, "train", cfg.data.max_len)
    held = preference_step.items(built.eval, objective.objective, "eval", cfg.data.max_len)
    hook = pref_eval.InTraining(objective, held, plan.micro_batch_size, plan.device) if held else None
    return train, held, hook


def _start_folder(out: Path, cfg: Config, built: Built | BuiltPairs, start: Path | None, manifest: dict | None,
                  created: bool, keep: list[Path], log: Log) -> None:
    """Rank 0's first writes: the folder marked as this run's (or adopted, resuming), stale checkpoints cleaned,
    the records left out listed."""
    if start is None:
        _prepare_output(out, cfg, manifest, created, keep, log)
    else:
        runfolder.adopt(out)
    checkpoint.clean(out)
    _write_skipped(out, built.skipped, log)


def _save(model: torch.nn.Module, cfg: Config, out: Path, procs: Processes, result: dict, log: Log) -> dict:
    """The final adapter from rank 0 (the trained weights gathered whole over the processes), then the summary."""
    with procs.gathered(model) as weights:
        if procs.is_main:
            save(model, cfg, out, weights)
    lora.release(model)  # PiSSA's initial adapter: no save follows the final one
    procs.barrier()
    log(f"saved the adapter, config.yaml, metrics.jsonl and TensorBoard logs to {out}")
    result["output_dir"] = str(out)
    if procs.is_main:
        summary.write(out, result, model, log)  # summary.json + loss.png; never fails the run
    return result


def _grpo(cfg: config_mod.Config, tokenizer: PreTrainedTokenizerBase, rewards: tuple[rewards_mod.Reward, ...],
          out: Path, resuming: bool, log: Callable[[str], None]
          ) -> tuple[config_mod.Config, grpo_step.GrpoObjective | None]:
    """(cfg, train.objective=grpo's step; None for other objectives); a resume checks that the user's rewards are
    the code the run trained with."""
    if cfg.train.objective != "grpo":
        return cfg, None
    objective = grpo_step.make(cfg, tokenizer, pad_id(tokenizer), rewards)
    if resuming:
        rewards_mod.check_record(out, objective.rewards)
    return grpo_step.one_prompt_per_micro_batch(cfg, log), objective


def _compare_memory(result: dict, predicted: float | None, log: Log) -> None:
    if "peak_reserved_gib" in result and predicted is not None:
        meas = result["peak_reserved_gib"]
        log(f"GPU memory: measured peak {meas:.2f} GiB reserved ({result['peak_allocated_gib']:.2f} allocated), "
            f"predicted {predicted / GIB:.2f} GiB ({100 * (predicted / GIB / meas - 1):+.1f}%)")
        result["predicted_peak_gib"] = predicted / GIB


class _Callable(types.ModuleType):
    """`slimtune.train(cfg)` is the public API's train; it stays this module too, since importing a
    submodule binds its name on the package (a function of that name would be replaced by it)."""

    def __call__(self, cfg: Config, overwrite: bool = False, show_progress: bool = True, log: Log = print,
                 resume: bool = False) -> dict:
        """Train per the config, as `slimtune train` does; returns the run summary."""
        return self.from_config(cfg, overwrite=overwrite, show_progress=show_progress, log=log, resume=resume)


sys.modules[__name__].__class__ = _Callable
