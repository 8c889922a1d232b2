"""slimtune: fine-tune language models with LoRA and other adapters on small hardware.

The Python API (README, "Python API"); each name is imported on first use, so `import slimtune` stays
quick (torch, transformers and peft load only when a function needs them):

    load_config(path=None, overrides=())            the typed Config, checked as `slimtune train` checks it
    apply_method(model, name="lora", **fields)      any method on any nn.Module; returns the model to train
    count_parameters(model) -> (trainable, total)   as peft's print_trainable_parameters counts
    prepare(model, cfg, device)                     checkpointing, method, precision, fast kernels -> Prepared
    fit(model, data, cfg, loss_fn=None, ...)        slimtune's LM training, or AdamW on the caller's loss
    save(model, folder) / load(folder, model=None)  peft's format (or the trained parameters) and back
    train(cfg)                                      what `slimtune train` runs; returns the run summary
    SlimtuneError                                   base of every error a user's input can cause (ConfigError, ...)
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_WHERE = {
    "load_config": "api", "apply_method": "api", "count_parameters": "api", "fit": "api", "save": "api",
    "load": "api", "method_config": "api", "prepare": "train", "Prepared": "train",
    "describe_parameters": "methods.heads", "FrozenModuleWarning": "methods.heads",
    "Config": "config", "ConfigError": "config", "MethodError": "methods.base", "PrecisionError": "engine.precision",
    "DataError": "data.readers", "SlimtuneError": "errors",
}
__all__ = ["__version__", "train", *_WHERE]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs; at run time __getattr__ imports
    from . import train
    from .api import apply_method, count_parameters, fit, load, load_config, method_config, save
    from .config import Config, ConfigError
    from .data.readers import DataError
    from .engine.precision import PrecisionError
    from .errors import SlimtuneError
    from .methods.base import MethodError
    from .methods.heads import FrozenModuleWarning, describe_parameters
    from .train import Prepared, prepare


def __getattr__(name: str):
    if name == "train":  # the module slimtune/train.py, callable: slimtune.train(cfg) runs train.from_config
        return importlib.import_module(".train", __name__)
    if name not in _WHERE:
        raise AttributeError(f"module 'slimtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
