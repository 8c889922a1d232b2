"""A training run, top to bottom: config -> tokenizer -> data -> model -> method -> fit -> save."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import config as config_mod
from . import methods, models
from .config import ConfigError
from .data import build
from .data.collate import pad_id
from .engine import precision
from .engine import checkpoint, memory
from .engine.loop import fit
from .engine.memory import GIB
from .engine.precision import base_dtype_name
from .evaluate import summary
from .evaluate.report import in_training
from .export.peft_format import read_config, save
from .methods.quant import quantization_config


def _is_run(out: Path) -> bool:
    return any((out / name).exists() for name in ("config.yaml", "metrics.jsonl", checkpoint.ROOT))


def _check_output(out: Path, cfg, overwrite: bool, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: a fresh run). Refuses, before anything is loaded, to mix two
    runs in one folder: a folder holding files needs --overwrite, or --resume with the same config."""
    if overwrite and resume:
        raise ConfigError("--overwrite replaces the run in train.output_dir and --resume (train.resume=auto) "
                          "continues it; choose one")
    if not out.exists() or not any(out.iterdir()):
        return None
    if not _is_run(out):
        raise FileExistsError(f"train.output_dir: {out} already holds files that are not a slimtune run; "
                              "choose another folder")
    if overwrite:
        return None
    if not resume:
        raise FileExistsError(f"train.output_dir: {out} already holds files; choose another folder, pass --resume "
                              "to continue that run, or --overwrite to replace it")
    last = checkpoint.latest(out)
    if last is not None or (out / "config.yaml").is_file():
        diff = checkpoint.differences(read_config(last or out), cfg)
        if diff:
            raise FileExistsError(f"train.output_dir: {out} holds a different run, which --resume would mix with "
                                  "this one: " + "; ".join(diff) + ". Use that run's config, or another folder")
    return last


def _prepare_output(out: Path, clear: bool, cfg) -> None:
    """A fresh run starts in an empty folder (clearing one that _check_output let through) with its
    config.yaml, so a killed run is known for what it is."""
    if clear and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
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
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return True


def _predict(cfg, built, log, device: str = "cpu") -> float | None:
    """The memory estimate for this run's worst micro-batch, printed before the model loads; on a GPU,
    a faster split of the same records per step when there is one (memory.faster)."""
    try:
        sizes = sorted(((len(e.input_ids), sum(x != -100 for x in e.labels)) for e in built.train), reverse=True)
        est = memory.estimate(cfg, sizes[: cfg.train.micro_batch_size])
        quick = memory.faster(cfg, sizes[: cfg.train.micro_batch_size]) if device.startswith("cuda") else None
    except Exception as err:  # an estimate must never stop a run: architectures differ in ways it can't see
        log(f"memory estimate unavailable: {err}")
        return None
    log(f"predicted peak GPU memory: {est.peak / GIB:.2f} GiB (+{est.cuda_context / GIB:.1f} GiB CUDA context; "
        "`slimtune estimate` shows the parts)")
    if quick:
        log(f"hint: {quick[0]} trains the same records per step in fewer, larger micro-batches, usually faster "
            f"(predicted {quick[1] / GIB:.2f} GiB with the CUDA context)")
    return est.peak


def run(cfg, overwrite: bool = False, show_progress: bool = True, log=print, resume: bool = False) -> dict:
    """Train per the config; returns the run summary (losses, steps, timings). resume (or
    train.resume=auto) continues from the newest complete checkpoint in train.output_dir."""
    if not cfg.data.train:
        raise FileNotFoundError("data.train: no training data given (set data.train=path/to/data.jsonl)")
    for key, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{key}: {path} does not exist")
    out = Path(cfg.train.output_dir)
    resume = resume or cfg.train.resume == "auto"
    start = _check_output(out, cfg, overwrite, resume)
    device = models.pick_device(cfg.train.device)
    quant = quantization_config(cfg.method, cfg.train.precision)  # qlora without CUDA stops here, before anything loads
    plan = precision.plan(cfg.train.precision, device, cfg.train.adam_eps)  # so do fp16 traps
    tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    built = build(cfg.data, tokenizer, log)  # every record is checked before the model is loaded
    if start is None:
        _prepare_output(out, clear=overwrite or resume, cfg=cfg)
    checkpoint.clean(out)
    _write_skipped(out, built.skipped, log)
    predicted = _predict(cfg, built, log, device)
    model, _ = models.load(cfg.model.path, base_dtype_name(cfg, device), cfg.model.trust_remote_code, device, quant)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model, cfg.method, log)
    torch.manual_seed(cfg.train.seed)  # adapter init (PiSSA's randomized SVD too) is the same on every resume
    model = methods.apply(model, cfg.method)
    precision.cast_trainable(model, plan.trainable)
    trainable, total = methods.count_parameters(model)  # as peft's print_trainable_parameters
    log(f"method {cfg.method.name}: trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}")
    hook = in_training(tokenizer, cfg, built.eval_examples, built.eval, device) if built.eval else None
    result = fit(model, built.train, built.eval, cfg, pad_id(tokenizer), out, device, log, show_progress, plan,
                 resume=start, evaluate=hook)
    if result.get("interrupted"):
        log(f"{result['interrupted']}: stopped after step {result['stopped_at']} of {result['steps']}; checkpoint "
            f"{checkpoint.latest(out)}; `slimtune train CONFIG --resume` goes on from there")
        return dict(result, output_dir=str(out))
    _compare_memory(result, predicted, log)
    save(model, cfg, out)
    log(f"saved the adapter, config.yaml, metrics.jsonl and TensorBoard logs to {out}")
    result["output_dir"] = str(out)
    summary.write(out, result, model, log)  # summary.json + loss.png; never fails the run
    return result


def _compare_memory(result: dict, predicted: float | None, log) -> None:
    if "peak_reserved_gib" in result and predicted is not None:
        meas = result["peak_reserved_gib"]
        log(f"GPU memory: measured peak {meas:.2f} GiB reserved ({result['peak_allocated_gib']:.2f} allocated), "
            f"predicted {predicted / GIB:.2f} GiB ({100 * (predicted / GIB / meas - 1):+.1f}%)")
        result["predicted_peak_gib"] = predicted / GIB
