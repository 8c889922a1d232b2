"""`slimtune targets`: a model's Linear/Conv1D modules (LoRA targets), shapes and counts, from config.json."""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM

from .. import models
from ..methods.targets import describe


def run(args: argparse.Namespace) -> int:
    mcfg = models.load_config(args.model, args.trust_remote_code)
    with torch.device("meta"):  # shapes only: no weights are read
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=args.trust_remote_code)
    print(describe(model))
    return 0
