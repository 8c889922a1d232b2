"""A run folder: the adapter in peft's own format, the resolved config.yaml and metrics.jsonl.

`peft.PeftModel.from_pretrained(base, folder)` loads the adapter with no slimtune code; slimtune's
own `load_run` reads config.yaml to find the base model and the chat template too.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .. import config as config_mod
from .. import models


def save(model, cfg, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)  # adapter_config.json + adapter_model.safetensors
    (out_dir / "config.yaml").write_text(config_mod.dump(cfg), encoding="utf-8")


def read_config(folder: Path) -> config_mod.Config:
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no config.yaml; give a folder written by `slimtune train`")
    return config_mod.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, str(path))


def load_run(folder: str | Path, device: str = "cpu"):
    """(model with the adapter, tokenizer, config) from a run folder, in eval mode."""
    from peft import PeftModel

    folder = Path(folder)
    cfg = read_config(folder)
    base, tokenizer = models.load(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code, device)
    if not (folder / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json; the run did not finish saving")
    model = PeftModel.from_pretrained(base, folder).to(device)
    model.eval()
    return model, tokenizer, cfg
