"""`slimtune targets`: a model's Linear/Conv1D modules (LoRA targets), shapes and counts, from config.json."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from .. import models
from ..methods.targets import describe
from .options import TRUST_HELP


def add(tg) -> None:
    tg.add_argument("model", help="model folder (config.json is enough), .gguf file, or 'embedded'")
    tg.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def run(args) -> int:
    mcfg = models.load_config(args.model, args.trust_remote_code)
    with torch.device("meta"):  # shapes only: no weights are read
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=args.trust_remote_code)
    print(describe(model))
    return 0
