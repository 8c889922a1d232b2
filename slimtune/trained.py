"""A trained model loaded from a run folder (or from an exported .gguf file) for use: what eval, chat,
generate, merge, export, the web app and the Python API answer with. The run folder's files are read through
slimtune/runs/ (config.yaml, the adapter, the checks that it is a finished run); here the base model loads in
the dtype the run trained in (engine/precision.py), with its own code only where the user allows it
(trust.py), which is why this sits above the engine and not in runs/.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import config as config_mod
from . import models, trust
from .engine.precision import base_dtype_name
from .methods.quant import load_base, quantization_config
from .runs.adapter import load_adapter, read_config
from .runs.checks import check_run

if TYPE_CHECKING:
    import argparse

    import torch
    from transformers import PreTrainedTokenizerBase


def load_run(folder: str | Path, device: str = "cpu", quantized: bool = True, dtype: str | None = None,
             trust_remote_code: bool = False) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, config_mod.Config]:
    """(trained model, tokenizer, config) from a run folder, in eval mode. quantized=False loads a
    qlora run's base in full precision (for merging); dtype: the base's dtype ("fp32"...) instead of the
    run's. trust_remote_code: the user's own flag; the run's config.yaml never turns it on."""
    folder = Path(folder)
    cfg = read_config(folder)
    # what this process allowed, for anything downstream: the user's flag, never the run's config.yaml
    cfg.model.trust_remote_code = trust.decide(cfg, folder / "config.yaml", trust_remote_code, run=True)
    quant = quantization_config(cfg.method, cfg.train.precision) if quantized else None  # as the run trained
    dtype = dtype or base_dtype_name(cfg, device)
    # a qlora base as it trained: fused experts packed in NF4 beside bitsandbytes' Linear layers
    base, tokenizer = load_base(cfg.model.path, dtype, cfg.model.trust_remote_code, device, quant)
    model = load_adapter(base, folder)
    model.eval()
    return model, tokenizer, cfg


def load_for_inference(args: argparse.Namespace) -> tuple[torch.nn.Module, PreTrainedTokenizerBase,
                                                           config_mod.Config, str]:
    """(model in eval mode, tokenizer, config, device) of a run folder or an exported .gguf file, as chat and
    generate load it; args: their flags (folder, device, trust_remote_code)."""
    device = models.pick_device(args.device)
    if str(args.folder).endswith(".gguf"):  # an exported file: its own chat template, no run config
        model, tokenizer = models.load(args.folder, device=device)
        return model.eval(), tokenizer, config_mod.load(None, [f"model.path={args.folder}"]), device
    check_run(args.folder)
    model, tokenizer, cfg = load_run(args.folder, device, trust_remote_code=args.trust_remote_code)
    return model, tokenizer, cfg, device
