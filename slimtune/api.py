"""The public Python API, re-exported by `slimtune/__init__.py`: a config, a method on any nn.Module
(a transformers causal LM, an encoder such as BERT, the user's own module), training with slimtune's
language-model loss or the caller's own, and the artifact saved in peft's format and loaded back.

`prepare` (the sequence `slimtune train` runs) and `train` itself live in slimtune/train.py.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import config as config_mod
from . import methods
from .config import Config, ConfigError, MethodConfig
from .data.encode import Encoded
from .data.readers import DataError
from .data.prompts import PromptRecord
from .engine import grpo_step, loop, run_plan, user_loss
from .evaluate.perplexity import loss_eval
from .errors import MissingFileError
from . import trained
from .runs import adapter
from .methods import parts
from .methods import kinds
from .methods.base import MethodError, is_peft, on_device_of
from .methods.heads import warn_frozen
from .objectives.rewards import from_callable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """The config from a YAML file (None: the defaults) and dotted overrides ("train.lr=1e-4"), checked
    as `slimtune train` checks it; ConfigError lists every problem."""
    return config_mod.load(path, list(overrides))


def method_config(name: str = "lora", **fields: object) -> MethodConfig:
    """A checked MethodConfig: `fields` are method.* keys (r=16, target_modules=["query", "value"], ...)."""
    tree = {"name": name, **{k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}}
    try:
        return config_mod.from_dict({"method": tree}, "apply_method").method
    except ConfigError as err:  # every line says where: "apply_method: method.r: must be at least 1"
        lines = [x if x.startswith("apply_method: ") else f"apply_method: {x}" for x in str(err).splitlines()]
        raise ConfigError("\n".join(lines)) from None


def _quantized(model: torch.nn.Module) -> bool:
    return any(type(p).__name__ in ("Params4bit", "Int8Params") for p in model.parameters())


def apply_method(model: torch.nn.Module, name: str = "lora", *, heads: Sequence[str] = (),
                 **fields: object) -> torch.nn.Module:
    """Apply method `name` to any nn.Module; returns the model to train (a PeftModel for peft methods).

    Args:
        fields: method.* settings, e.g. r=16, target_modules=["query", "value"], modules_to_save=["head"].
            A model with no architecture default (no transformers config) needs target_modules; the
            error lists the Linear modules there are.
        heads: modules (names in `model`) that are not in the pretrained checkpoint. A FrozenModuleWarning
            names those the method leaves frozen; a wrapper's direct submodules outside its transformers
            model count as such without being named, looked for inside nn.DataParallel,
            DistributedDataParallel and torch.compile's wrapper too.
    """
    cfg = method_config(name, **fields)
    if cfg.name == "qlora" and not _quantized(model):
        raise MethodError("method qlora trains LoRA on a base that bitsandbytes quantized while loading (CUDA), and "
                          f"this {type(model).__name__}'s weights are not quantized; load it with transformers' "
                          "from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True)) first, "
                          "or use lora")
    model = methods.apply(model, cfg)
    warn_frozen(model, cfg.name, tuple(heads))
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counted as peft's print_trainable_parameters counts them."""
    return methods.count_parameters(model)


def fit(model: torch.nn.Module, data: Iterable, cfg: Config, loss_fn: user_loss.LossFn | None = None, *,
        eval_data: Sequence[Encoded] = (), device: str | None = None, out_dir: str | Path | None = None,
        pad_id: int = 0, log: Callable[[str], None] = print, show_progress: bool = False,
        rewards: Sequence[Callable] = (), tokenizer: PreTrainedTokenizerBase | None = None) -> dict:
    """Train a prepared model per cfg.train; returns the run summary (losses, steps, timings).

    Args:
        data: with loss_fn=None, encoded records (slimtune.data's Encoded) for a causal LM, trained with
            slimtune's engine (checkpoints and metrics.jsonl in out_dir, default train.output_dir);
            with loss_fn, dict batches of tensors (a list or a DataLoader), moved to `device`.
        loss_fn: (model, batch) -> scalar loss tensor, for models whose forward returns no LM loss.
        device: where batches go; None: where the model's parameters are.
        rewards: train.objective=grpo: reward functions fn(prompts, completions, answers) -> list[float],
            beside the built-ins cfg.grpo.rewards names; data are then prompts (slimtune.data.prompts.build_prompts)
            and `tokenizer` decodes the completions.
    """
    device = device or str(on_device_of(model))
    if loss_fn is not None:
        return user_loss.fit(model, data, cfg, loss_fn, device, log)
    base = model.get_base_model() if is_peft(model) else model
    if not kinds.is_causal_lm(base):
        raise MethodError(f"fit: {type(base).__name__} is not a transformers causal LM, so slimtune's language-model "
                          "loss does not apply; pass loss_fn=(model, batch) -> loss and dict batches")
    records = list(data)
    if cfg.train.objective == "grpo":
        return _fit_grpo(model, records, cfg, rewards, tokenizer, device, out_dir, pad_id, log, show_progress)
    if records and not isinstance(records[0], Encoded):
        raise DataError(f"fit: data holds {type(records[0]).__name__} items; without loss_fn it takes encoded "
                          "records (slimtune.data.encode_examples), with loss_fn dict batches")
    out = Path(out_dir or cfg.train.output_dir)
    held = list(eval_data)
    plan = run_plan.resolve(cfg, device, model=model)  # split, checkpointing, dtypes, kernels, loss: once
    log(plan.describe())
    cfg = plan.apply(cfg)
    scored = loss_eval(held, pad_id, plan.micro_batch_size, device, plan.chunked_loss)
    return loop.fit(model, records, held, cfg, pad_id, out, device, log, show_progress, plan, evaluate=scored)


def _fit_grpo(model: torch.nn.Module, records: list, cfg: Config, rewards: Sequence[Callable],
              tokenizer: PreTrainedTokenizerBase | None, device: str, out_dir: str | Path | None, pad_id: int,
              log: Callable[[str], None], show_progress: bool) -> dict:
    """fit for train.objective=grpo: prompts, the rewards given here and cfg's built-ins."""
    if tokenizer is None:
        raise ConfigError("fit: train.objective=grpo decodes completions for the rewards: pass tokenizer=")
    if not records or not isinstance(records[0], PromptRecord):
        raise DataError("fit: train.objective=grpo takes prompts (slimtune.data.prompts.build_prompts(...).train)")
    objective = grpo_step.make(cfg, tokenizer, pad_id, tuple(from_callable(f) for f in rewards))
    plan = run_plan.resolve(grpo_step.one_prompt_per_micro_batch(cfg, log), device, model=model)
    log(plan.describe())
    return loop.fit(model, records, [], plan.apply(cfg), pad_id, Path(out_dir or cfg.train.output_dir), device, log,
                    show_progress, plan, objective=objective)


def save(model: torch.nn.Module, folder: str | Path, cfg: Config | None = None) -> Path:
    """The method's artifact in `folder`: peft's adapter_config.json + adapter_model.safetensors (heads in
    modules_to_save included), or for full/freeze/bitfit the trained parameters; with cfg also config.yaml,
    so load(folder) alone finds the base model."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if cfg is not None:
        adapter.save(model, cfg, folder)
    else:
        methods.save(model, folder)
    return folder


def load(folder: str | Path, model: torch.nn.Module | None = None, device: str = "cpu") -> torch.nn.Module:
    """The trained model, in eval mode: the artifact in `folder` put on `model` (the same base the method
    was applied to, built afresh), or with model=None on the base named by the folder's config.yaml."""
    folder = Path(folder)
    if model is None:
        return trained.load_run(folder, device)[0]
    if (folder / "adapter_config.json").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folder)
    elif adapter.parts_saved(folder):
        model = adapter.load_parts(model, folder)
    else:
        raise MissingFileError(f"{folder}: neither adapter_config.json nor {parts.PARTS}; give a folder that "
                               "slimtune.save or `slimtune train` wrote")
    return model.eval()
