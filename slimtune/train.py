"""A training run, top to bottom: config -> tokenizer -> data -> model -> method -> fit -> save."""
from __future__ import annotations

import shutil
from pathlib import Path

from . import methods, models
from .data import build
from .data.collate import pad_id
from .engine import precision
from .engine import memory
from .engine.loop import fit
from .engine.memory import GIB
from .engine.precision import base_dtype_name
from .export.peft_format import save
from .methods.quant import quantization_config


def _prepare_output(out: Path, overwrite: bool) -> None:
    """Refuse to mix two runs in one folder (before anything is loaded)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"train.output_dir: {out} already holds files; choose another folder or "
                                  "pass --overwrite to replace them")
        if not (out / "config.yaml").is_file() and not (out / "metrics.jsonl").is_file():
            raise FileExistsError(f"train.output_dir: {out} holds files that are not a slimtune run; "
                                  "refusing to delete them")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


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


def _predict(cfg, built, log) -> float | None:
    """The memory estimate for this run's worst micro-batch, printed before the model loads."""
    try:
        sizes = sorted(((len(e.input_ids), sum(x != -100 for x in e.labels)) for e in built.train), reverse=True)
        est = memory.estimate(cfg, sizes[: cfg.train.micro_batch_size])
    except Exception as err:  # an estimate must never stop a run: architectures differ in ways it can't see
        log(f"memory estimate unavailable: {err}")
        return None
    log(f"predicted peak GPU memory: {est.peak / GIB:.2f} GiB (+{est.cuda_context / GIB:.1f} GiB CUDA context; "
        "`slimtune estimate` shows the parts)")
    return est.peak


def run(cfg, overwrite: bool = False, show_progress: bool = True, log=print) -> dict:
    """Train per the config; returns the run summary (losses, steps, timings)."""
    if not cfg.data.train:
        raise FileNotFoundError("data.train: no training data given (set data.train=path/to/data.jsonl)")
    for key, path in (("data.train", cfg.data.train), ("data.eval", cfg.data.eval)):
        if path and not Path(path).exists():
            raise FileNotFoundError(f"{key}: {path} does not exist")
    out = Path(cfg.train.output_dir)
    device = models.pick_device(cfg.train.device)
    quant = quantization_config(cfg.method)  # qlora without CUDA stops here, before anything loads
    plan = precision.plan(cfg.train.precision, device, cfg.train.adam_eps)  # so do fp16 traps
    tokenizer = models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    built = build(cfg.data, tokenizer, log)  # every record is checked before the model is loaded
    _prepare_output(out, overwrite)
    predicted = _predict(cfg, built, log)
    model, _ = models.load(cfg.model.path, base_dtype_name(cfg, device), cfg.model.trust_remote_code, device, quant)
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(model, cfg.method, log)
    model = methods.apply(model, cfg.method)
    precision.cast_trainable(model, plan.trainable)
    trainable, total = methods.count_parameters(model)  # as peft's print_trainable_parameters
    log(f"method {cfg.method.name}: trainable params: {trainable:,} || all params: {total:,} || "
        f"trainable%: {100 * trainable / total:.4f}")
    result = fit(model, built.train, built.eval, cfg, pad_id(tokenizer), out, device, log, show_progress, plan)
    if "peak_reserved_gib" in result and predicted is not None:
        meas = result["peak_reserved_gib"]
        log(f"GPU memory: measured peak {meas:.2f} GiB reserved ({result['peak_allocated_gib']:.2f} allocated), "
            f"predicted {predicted / GIB:.2f} GiB ({100 * (predicted / GIB / meas - 1):+.1f}%)")
        result["predicted_peak_gib"] = predicted / GIB
    save(model, cfg, out)
    log(f"saved the adapter, config.yaml and metrics.jsonl to {out}")
    result["output_dir"] = str(out)
    return result
