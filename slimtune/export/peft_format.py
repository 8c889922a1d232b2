"""A run folder: the adapter in peft's own format (or, for full/freeze/bitfit, the trained parameters),
the resolved config.yaml and metrics.jsonl.

`peft.PeftModel.from_pretrained(base, folder)` loads the adapter with no slimtune code; slimtune's
own `load_run` reads config.yaml to find the base model and the chat template too.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .. import config as config_mod
from .. import models


def save(model, cfg, out_dir: Path, weights: dict | None = None) -> None:
    """The method's artifact (peft adapter, or our trained parts) plus the resolved config.yaml.
    weights: the trainable parameters whole, when the model's own are sharded."""
    from .. import methods

    out_dir.mkdir(parents=True, exist_ok=True)
    methods.save(model, out_dir, weights)
    (out_dir / "config.yaml").write_text(config_mod.dump(cfg), encoding="utf-8")


def read_config(folder: Path) -> config_mod.Config:
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.yaml; give a folder written by `slimtune train`")
    return config_mod.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path))


def load_run(folder: str | Path, device: str = "cpu", quantized: bool = True, dtype: str | None = None):
    """(trained model, tokenizer, config) from a run folder, in eval mode. quantized=False loads a
    qlora run's base in full precision (for merging); dtype: the base's dtype ("fp32"...) instead of the
    run's."""
    from peft import PeftModel

    from ..engine.precision import base_dtype_name
    from ..methods.quant import quantization_config
    from . import parts

    folder = Path(folder)
    cfg = read_config(folder)
    quant = quantization_config(cfg.method, cfg.train.precision) if quantized else None  # as the run trained
    dtype = dtype or base_dtype_name(cfg, device)
    base, tokenizer = models.load(cfg.model.path, dtype, cfg.model.trust_remote_code, device, quant)
    if (folder / "adapter_config.json").is_file():
        model = PeftModel.from_pretrained(base, folder)
    elif (folder / parts.PARTS).is_file():
        model = parts.load(base, folder)
    else:
        raise FileNotFoundError(f"{folder}: neither adapter_config.json nor {parts.PARTS}; the run did not "
                                "finish saving")
    model.eval()
    return model, tokenizer, cfg
