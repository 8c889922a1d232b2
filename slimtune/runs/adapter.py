"""A run folder's trained part: the adapter in peft's own format (or, for full/freeze/bitfit, the trained
parameters) beside the resolved config.yaml (metrics.jsonl is runs/metrics_log.py's).

`peft.PeftModel.from_pretrained(base, folder)` loads the adapter with no slimtune code, and so does
`AutoPeftModelForCausalLM.from_pretrained(folder)`: adapter_config.json's base_model_name_or_path is the
base's path, for the embedded model its converted folder on this machine. slimtune's own `load_run`
(slimtune/trained.py) reads config.yaml to find the base model and the chat template, then puts the
adapter on it with `load_adapter`; there a run on the embedded model records model.path "embedded", which
`models.resolve` finds on any machine with slimtune.

A run folder is untrusted input: its config.yaml never switches on trust_remote_code (only the person
running the command does, with --trust-remote-code: slimtune/trust.py), and pickled adapters load only as
plain tensors.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from .. import config as config_mod
from .. import methods, models
from ..errors import DamagedFileError, MissingFileError
from ..methods import parts
from . import sharded

if TYPE_CHECKING:
    import torch

# the files of a run folder that load_run reads (checkpoints aside)
READS = ("config.yaml", "adapter_config.json", "adapter_model.safetensors", "adapter_model.bin", parts.PARTS)


def save(model: torch.nn.Module, cfg: config_mod.Config, out_dir: Path,
         weights: dict[str, torch.Tensor] | None = None) -> None:
    """The method's artifact (peft adapter, or our trained parts) plus the resolved config.yaml.
    weights: the trainable parameters whole, when the model's own are sharded."""
    out_dir.mkdir(parents=True, exist_ok=True)
    methods.save(model, out_dir, weights)  # peft's save also names the base portably (methods/lora.py)
    (out_dir / "config.yaml").write_text(config_mod.dump(cfg), encoding="utf-8")


def read_config(folder: Path) -> config_mod.Config:
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise MissingFileError(f"{folder}: no config.yaml; give a folder written by `slimtune train`")
    return config_mod.load(path)  # its YAML errors too as one ConfigError naming the file, not a traceback


def load_adapter(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """The run's trained model: peft adapter or our trained parts on the base."""
    from peft import PeftModel

    if (folder / "adapter_config.json").is_file():
        try:
            return PeftModel.from_pretrained(base, folder)
        except pickle.UnpicklingError as err:  # adapter_model.bin with more than tensors
            raise models.UnsafeFileError(models.pickle_refused(folder / "adapter_model.bin", err)) from None
        except (SafetensorError, json.JSONDecodeError) as err:  # a save cut short, or a file damaged since
            raise DamagedFileError(f"{folder}: its adapter files cannot be read ({type(err).__name__}: {err}); "
                                   "restore them or train the run again") from None
    if parts_saved(folder):
        return load_parts(base, folder)
    raise MissingFileError(f"{folder}: neither adapter_config.json nor {parts.PARTS}; the run did not "
                           "finish saving")


def parts_saved(folder: str | Path) -> bool:
    """The folder holds our methods' trained parts: the file, or a checkpoint's DCP shards (runs/sharded.py)."""
    return (Path(folder) / parts.PARTS).is_file() or sharded.present(folder)


def load_parts(base: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """methods.parts.load, and for a checkpoint of a full fine-tuning on several GPUs (no parts file, DCP
    shards instead) the weights consolidated from its shards; the base model is changed in place."""
    if not (Path(folder) / parts.PARTS).is_file() and sharded.present(folder):
        sharded.load_weights(folder, dict(base.named_parameters()))
        return base
    return parts.load(base, folder)
