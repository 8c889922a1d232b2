"""A training run, top to bottom: config -> tokenizer -> data -> model -> method -> fit -> save."""
from __future__ import annotations

import contextlib
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from . import config as config_mod
from . import methods, models, outputs
from .config import ConfigError, batch
from .data import build
from .data.collate import pad_id
from .data.prompts import PromptRecord, build_prompts
from .engine import precision
from .engine import checkpoint, distributed, grpo_step, host_memory, memory, plan as split_plan, runfolder
from .engine.loop import fit
from .engine.memory import GIB
from .engine.precision import base_dtype_name
from .engine.runfolder import RunFolderError
from .errors import ExistingFileError, MissingFileError
from .evaluate import summary
from .evaluate.report import in_training
from .methods.parts import PARTS
from .kernels import select
from .kernels.select import Kernels
from .export.peft_format import read_config, save
from .methods import kinds, lora
from .methods.heads import describe_parameters, warn_frozen
from .methods.quant import quantization_config
from .objectives import rewards as rewards_mod

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def _check_output(out: Path, cfg, overwrite: bool, resume: bool, keep: list[Path],
                  log=print) -> tuple[Path | None, dict | None]:
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


def _resume_from(out: Path, cfg, marked: bool) -> Path:
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


def _prepare_output(out: Path, cfg, manifest: dict | None, created: bool, protect: list[Path], log) -> None:
    """A fresh run removes what an earlier run wrote here (its own files, never the user's), then marks the
    folder as a run and writes its config.yaml, so a killed run is known for what it is."""
    if manifest is not None:
        gone = runfolder.remove_own(out, manifest, protect)
        if gone:
            log(f"removed the earlier run's {', '.join(gone)} from {out}; other files there were kept")
        created = bool(manifest.get("created_folder"))
    runfolder.write_manifest(out, created, runfolder.entries(out) - {runfolder.MANIFEST})
    (out / "config.yaml").write_text(config_mod.dump(cfg), encoding="utf-8")


def _write_skipped(out: Path, skipped: list[dict], log) -> None:
    path = out / "skipped_records.jsonl"
    path.unlink(missing_ok=True)
    if skipped:
        with path.open("w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(s, default=str) + "\n" for s in skipped)
        log(f"{len(skipped)} records were left out of the run; each, with its reason, is in {path}")


def enable_checkpointing(model, cfg_method, log=print) -> bool:
    """Recompute activations in backward; returns whether it is on. Non-reentrant checkpointing needs no
    input that requires grad, so with a frozen embedding (every method but full) gradients still reach the
    adapters, and `enable_input_require_grads` is not needed: that hook would also make frozen layers
    below a `freeze` run's trainable ones keep activations for a backward they never need. Prefix tuning
    passes its prefix as a KV cache, which checkpointed layers drop (peft refuses the pair): it trains
    without checkpointing."""
    if cfg_method.name == "prefix_tuning":
        log("train.gradient_checkpointing is off for prefix_tuning: checkpointed layers would drop the learned "
            "prefix (its keys/values travel as a KV cache); activations take the memory they need")
        return False
    owner = model if hasattr(model, "gradient_checkpointing_enable") else kinds.pretrained_base(model)
    if owner is None:  # the user's own module: transformers' switch is not there to turn on
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} holds no transformers model, whose "
                          "gradient_checkpointing_enable this turns on; set it to false (or checkpoint in the "
                          "module's forward with torch.utils.checkpoint)")
    if hasattr(owner, "activation_checkpointing_enable"):  # transformers >= 5.25 (the old name warns there)
        owner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        owner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    owner.config.use_cache = False
    return True


def checkpointing_on(model) -> bool:
    """Whether transformers' activation checkpointing is on in any layer of `model` (wrapped or not)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def match_checkpointing(model, cfg, log=print) -> None:
    """`prepare` then `fit` (the Python API) resolves an auto split only in fit, after prepare has run: a
    split that chose checkpointing, with the layer inputs offloaded, must find it on in the model. Without it
    the offload hooks move every activation autograd saves to CPU memory: measured on an H100 at 8B, 1.26 s a
    step instead of 0.54, and a 7-15 s stall while pinned host memory grew."""
    if cfg.train.gradient_checkpointing and not checkpointing_on(model):
        if enable_checkpointing(model, cfg.method, log):
            log("gradient checkpointing on: the batch split chose it (prepare ran before the split was known)")


def _check_split(cfg, kept: int, held: int, log) -> None:
    """A held-out split (data.eval_size) that leaves fewer training records than one step takes, where the data
    had enough: refused when data.eval_size asked for every record (1e9 held out 39 of 40 records and trained on
    1, with exit 0), else warned about."""
    per_step, size, total = batch.records_per_step(cfg.train), cfg.data.eval_size, kept + held
    if cfg.data.eval or not held or kept >= per_step or total < per_step:
        return
    text = (f"data.eval_size={size:g} holds out {held} of the {total} training records, leaving {kept} to train on, "
            f"fewer than one step's batch (train.batch_size={per_step})")
    if (int(size) if size >= 1 else round(total * size)) < total:
        log(f"warning: {text}: every step trains on the same few records; a smaller data.eval_size trains on more")
        return
    raise ConfigError(f"{text}; set data.eval_size to a fraction below 1 or a count of at most {total - per_step}, "
                      "or give held-out records in data.eval")


def _sizes(built) -> list[tuple[int, int]]:
    """(length, trained tokens) of every training record, longest first: the worst micro-batches."""
    if built.train and isinstance(built.train[0], PromptRecord):  # GRPO: a prompt and its longest completion
        return sorted(((len(r.prompt_ids) + built.max_new, built.max_new) for r in built.train), reverse=True)
    return sorted(((len(e.input_ids), sum(x != -100 for x in e.labels)) for e in built.train), reverse=True)


def _predict(cfg, built, log, device: str = "cpu", hint: bool = True) -> float | None:
    """The memory estimate for this run's worst micro-batch, printed before the model loads; on a GPU,
    a faster split of the same records per step when there is one (memory.faster) and hint is set."""
    try:
        sizes = _sizes(built)
        est = memory.estimate(cfg, sizes[: cfg.train.micro_batch_size], distributed.size())
        quick = memory.faster(cfg, sizes[: cfg.train.micro_batch_size]) \
            if hint and device.startswith("cuda") and not distributed.active() else None
    except Exception as err:  # an estimate must never stop a run: architectures differ in ways it can't see
        log(f"memory estimate unavailable: {err}")
        return None
    per = " per GPU" if distributed.active() else ""
    if device.startswith("cuda"):
        log(f"predicted peak GPU memory{per}: {est.peak / GIB:.2f} GiB (+{est.cuda_context / GIB:.1f} GiB CUDA "
            "context; `slimtune estimate` shows the parts)")
    else:  # the estimate counts tensors, which the CPU holds too; the process adds its own memory
        log(f"predicted peak memory of the run's tensors: {est.peak / GIB:.2f} GiB (weights, gradients, optimizer "
            f"state, activations; on the CPU the process adds its own: metrics.jsonl logs its peak as rss_gib)")
    if quick:
        log(f"hint: {quick[0]} trains the same records per step in fewer, larger micro-batches, usually faster "
            f"(predicted {quick[1] / GIB:.2f} GiB with the CUDA context)")
    return est.peak


@dataclass(frozen=True)
class Prepared:
    """A model made ready to train, and what prepare chose on the way."""
    model: torch.nn.Module  # with the method applied (a PeftModel for peft methods)
    plan: precision.Plan  # dtypes of the base, the trainable weights and autocast; fp16 loss scaling
    kernels: Kernels | None = None  # the fast paths switched on (kernels/select.py); None unless asked


def prepare(model, cfg, device: str = "cpu", log=print, kernels: bool = False,
            heads: tuple[str, ...] = ()) -> Prepared:
    """The one sequence train, the bench scripts and users share: gradient checkpointing, the method
    (seeded with train.seed), trainable weights in the plan's dtype, and with kernels=True the fast paths
    train.* asks for on `device` (fit switches them on itself for its run, and off after; ask for them when
    driving engine steps yourself). Warns when a new module (a wrapper's head, or one named in `heads`)
    stays frozen."""
    plan = precision.plan(cfg.train.precision, device, cfg.train.adam_eps)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model, cfg.method, log)
    torch.manual_seed(cfg.train.seed)  # adapter init (PiSSA's randomized SVD too) is the same on every resume
    model = methods.apply(model, cfg.method)
    warn_frozen(model, cfg.method.name, heads)
    precision.cast_trainable(model, plan.trainable)
    log(f"method {cfg.method.name}: {describe_parameters(model)}")
    return Prepared(model, plan, select.enable(model, cfg.train, device, log) if kernels else None)


def run(cfg, overwrite: bool = False, show_progress: bool = True, log=print, resume: bool = False,
        protect: tuple = (), rewards: tuple[rewards_mod.Reward, ...] = ()) -> dict:
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
    device = distributed.init(models.pick_device(cfg.train.device))  # torchrun: this rank's GPU
    main = distributed.is_main()  # several processes: rank 0 speaks for the run and owns its folder
    if not main:
        log, show_progress = (lambda *a, **k: None), False
    made = runfolder.probe(out) if main else []  # a read-only folder or a full disk: one line now
    keep = [Path.cwd(), *(Path(p) for p in (cfg.data.train, cfg.data.eval, *protect) if p)]
    try:
        with runfolder.Lock(out, log) if main else contextlib.nullcontext():
            return _run(cfg, out, device, out in made, keep, overwrite, resume, show_progress, log, tuple(rewards))
    except OSError as err:  # a disk that fills mid-run, a folder made read-only: one line, not a traceback
        nice = runfolder.environment_error(err, out)
        if nice is None:
            raise
        raise nice from err
    finally:
        runfolder.remove_if_empty(made)  # a run stopped by a check leaves no folder behind


def _run(cfg, out: Path, device: str, created: bool, keep: list[Path], overwrite: bool, resume: bool,
         show_progress: bool, log, rewards: tuple[rewards_mod.Reward, ...] = ()) -> dict:
    """The run itself, holding the folder's lock: checks first, then the first write to output_dir."""
    why = distributed.check_method(cfg.method.name)
    if why:
        raise ConfigError(f"method.name={cfg.method.name} on {distributed.size()} processes: {why}")
    distributed.barrier()  # rank 0 has probed and locked the folder before every rank looks at it
    start, manifest = _check_output(out, cfg, overwrite, resume, keep, log)
    distributed.barrier()  # every rank has looked at the folder before rank 0 writes to it
    quant = quantization_config(cfg.method, cfg.train.precision)  # qlora without CUDA stops here, before anything loads
    plan = precision.plan(cfg.train.precision, device, cfg.train.adam_eps)  # so do fp16 traps
    tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    cfg, objective = _grpo(cfg, tokenizer, rewards, out, start is not None, log)
    # every record is checked before the model is loaded
    built = _grpo_prompts(cfg, tokenizer, objective, log) if objective else build(cfg.data, tokenizer, log)
    _check_split(cfg, len(built.train), len(built.eval), log)
    auto = split_plan.is_auto(cfg.train)
    if start is not None:  # an auto split goes on as the checkpoint's run chose it
        cfg = batch.adopt(read_config(start), cfg)
    cfg = split_plan.resolve(cfg, device, log, sizes=_sizes(built), gpus=distributed.size())  # before the load
    predicted = None if objective else _predict(cfg, built, log, device, hint=not auto)  # GRPO: its own, in fit
    if device == "cpu" and not objective:  # before the load: a record too long for the machine is one line
        host_memory.check(cfg, built.train, built.eval)
    # several processes: loaded on the CPU, then each layer moves to the GPU as FSDP2 shards it
    home = "cpu" if distributed.active() else device
    model, _ = models.load(cfg.model.path, base_dtype_name(cfg, device), cfg.model.trust_remote_code, home, quant)
    model = prepare(model, cfg, device, log).model
    if distributed.active():
        model = distributed.shard(model, device, cfg.train.fsdp_reshard, cfg.train.fsdp_prefetch)
        log(f"FSDP2: {distributed.size()} processes, {len(distributed.layers(model))} layer units + the root; "
            f"{cfg.train.batch_size} records per optimizer step over all of them")
    hook = in_training(tokenizer, cfg, built.eval_examples, built.eval, device, show_progress, built.train,
                       log) if built.eval else None
    # every check has passed: only now does output_dir get its first file
    if distributed.is_main():
        if start is None:
            _prepare_output(out, cfg, manifest, created, keep, log)
        else:
            runfolder.adopt(out)
        checkpoint.clean(out)
        _write_skipped(out, built.skipped, log)
    distributed.barrier()
    result = fit(model, built.train, built.eval, cfg, pad_id(tokenizer), out, device, log, show_progress, plan,
                 resume=start, evaluate=hook, objective=objective)
    if result.get("interrupted"):
        log(f"{result['interrupted']}: stopped after step {result['stopped_at']} of {result['steps']}; checkpoint "
            f"{checkpoint.latest(out)}; `slimtune train CONFIG --resume` goes on from there")
        return dict(result, output_dir=str(out))
    _compare_memory(result, predicted, log)
    with distributed.gathered(model) as weights:
        if distributed.is_main():
            save(model, cfg, out, weights)
    lora.release(model)  # PiSSA's initial adapter: no save follows the final one
    distributed.barrier()
    log(f"saved the adapter, config.yaml, metrics.jsonl and TensorBoard logs to {out}")
    result["output_dir"] = str(out)
    if distributed.is_main():
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


def _grpo_prompts(cfg: config_mod.Config, tokenizer: PreTrainedTokenizerBase, objective: grpo_step.GrpoObjective,
                  log: Callable[[str], None]) -> types.SimpleNamespace:
    """GRPO's prompts of data.train (held-out evaluation is not run for grpo: data.eval is not read)."""
    if cfg.data.eval:
        log(f"grpo: data.eval ({cfg.data.eval}) is not read; grpo runs no held-out evaluation")
    built = build_prompts(cfg.data, tokenizer, grpo_step.needs_answer(objective), log)
    return types.SimpleNamespace(train=built.train, eval=[], skipped=built.skipped, max_new=cfg.grpo.max_new_tokens)


def _compare_memory(result: dict, predicted: float | None, log) -> None:
    if "peak_reserved_gib" in result and predicted is not None:
        meas = result["peak_reserved_gib"]
        log(f"GPU memory: measured peak {meas:.2f} GiB reserved ({result['peak_allocated_gib']:.2f} allocated), "
            f"predicted {predicted / GIB:.2f} GiB ({100 * (predicted / GIB / meas - 1):+.1f}%)")
        result["predicted_peak_gib"] = predicted / GIB


class _Callable(types.ModuleType):
    """`slimtune.train(cfg)` is the public API's train; it stays this module too, since importing a
    submodule binds its name on the package (a function of that name would be replaced by it)."""

    def __call__(self, cfg, overwrite: bool = False, show_progress: bool = True, log=print,
                 resume: bool = False) -> dict:
        """Train per the config, as `slimtune train` does; returns the run summary."""
        return self.run(cfg, overwrite=overwrite, show_progress=show_progress, log=log, resume=resume)


sys.modules[__name__].__class__ = _Callable
