"""Importance matrix for the GGUF quantizers: how much each input column of every Linear matters.

llama.cpp's `llama-imatrix` runs the model over text and keeps, for each Linear weight, the mean of x_j^2
over tokens (x the layer's input): a rounding error e in column j reaches the output as e * x_j, so its
quantizers weigh column j's squared error by that mean. Here the same statistic comes from forward hooks
on the run's own training records (the data its config.yaml names), or on the demo's instruction data
for a merged folder (when it is in the cache: export never downloads); capped at MAX_RECORDS records and
MAX_TOKENS tokens. On SmolLM2-135M q4_0 it took the held-out loss from +12.3% over the source model to
+4.7% (bench/results/2026-12-03-cpu-gguf_export.jsonl).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import config as config_mod
from ..assets import data_file
from ..data import encode_pairs, read
from ..errors import MissingFileError, SlimtuneError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_RECORDS = 64
MAX_TOKENS = 2048  # the forward costs 2 * params * tokens FLOP: 0.5 TFLOP for a 135M model
DEMO_DATA = "alpaca_en_demo.json"  # generic instructions, for a merged folder that names no data


class ImatrixError(SlimtuneError, ValueError):
    """The records given for the importance matrix cannot be used."""


@dataclass
class Imatrix:
    """Per weight name (as in the model's safetensors) the mean squared input of each column."""

    columns: dict[str, np.ndarray]
    source: str  # the records it was computed from, for the log
    records: int
    tokens: int

    def describe(self) -> str:
        return f"importance matrix from {self.records} records ({self.tokens} tokens) of {self.source}"


def calibration(choice: str, run_cfg: config_mod.Config | None,
                log: Callable[[str], None] = print) -> tuple[list, config_mod.Config, str]:
    """(examples, config whose data section renders them, where they came from) for --imatrix CHOICE:
    'auto' = the run's training data (a merged folder: the demo's instruction data), or a records file.
    No examples when 'auto' finds none (the quantizers then weigh every column alike)."""
    cfg = run_cfg or config_mod.load(None, [])
    if choice != "auto":
        return read(choice, limit=MAX_RECORDS), cfg, choice
    train = run_cfg.data.train if run_cfg is not None else ""
    if train and Path(train).exists():
        return read(train, run_cfg.data.format, limit=MAX_RECORDS), cfg, train
    if train:
        log(f"importance matrix: the run's data.train {train} is not here; using the demo's instruction data")
    try:
        path = data_file(DEMO_DATA, download=False)  # export never downloads
    except MissingFileError as err:
        log(f"no calibration records ({err}); quantizing without an importance matrix")
        return [], cfg, ""
    return read(path, limit=MAX_RECORDS), cfg, str(path)


def _hook(sums: dict, name: str, last: list) -> Callable[[torch.nn.Module, tuple, object], None]:
    """A forward hook adding the column sums of the input's squares into sums[name]; `last` holds the latest
    (input, sums) pair, so Linears fed the same tensor (q/k/v, gate/up) square and sum it once."""
    def record(_module: torch.nn.Module, args: tuple, _output: object) -> None:
        if last and last[0] is args[0]:  # the held reference keeps the tensor, so `is` cannot see a reused id
            col = last[1]
        else:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            col = (x * x).sum(dim=0)
            last[:] = [args[0], col]
        if name in sums:
            sums[name] += col
        else:
            sums[name] = col.clone()

    return record


def collect(model: torch.nn.Module, batches: list[list[int]]) -> tuple[dict[str, np.ndarray], int]:
    """Mean squared input per column of every nn.Linear but the output head, over the token batches."""
    sums: dict[str, torch.Tensor] = {}
    out_head = model.get_output_embeddings()
    last: list = []
    hooks = [m.register_forward_hook(_hook(sums, f"{name}.weight", last)) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and m is not out_head]
    device = next(model.parameters()).device
    tokens = 0
    try:
        with torch.no_grad():
            for ids in batches:  # the decoder alone: the output head's logits are not needed
                model.base_model(torch.tensor([ids], device=device))
                tokens += len(ids)
    finally:
        last.clear()
        for h in hooks:
            h.remove()
    return {k: (v / max(tokens, 1)).float().cpu().numpy() for k, v in sums.items()}, tokens


def compute(folder: Path, tokenizer: PreTrainedTokenizerBase, choice: str, run_cfg: config_mod.Config | None = None,
            log: Callable[[str], None] = print) -> Imatrix | None:
    """The importance matrix of the transformers model in `folder`, or None for --imatrix off / no records."""
    from transformers import AutoModelForCausalLM

    if choice == "off":
        return None
    examples, cfg, source = calibration(choice, run_cfg, log)
    skipped: list[dict] = []
    pairs, _ = encode_pairs(examples, tokenizer, cfg.data, skipped, log=lambda *_: None)
    batches, total = [], 0
    for _, enc in pairs:
        if total >= MAX_TOKENS:
            break
        batches.append(enc.input_ids[:MAX_TOKENS - total])
        total += len(batches[-1])
    if skipped:
        log(f"importance matrix: {len(skipped)} of {len(examples)} records of {source} cannot be rendered and "
            f"are not used (first: {skipped[0]['reason']})")
    if not batches:
        if choice != "auto":
            raise ImatrixError(f"--imatrix {choice}: no record could be encoded; give a records file "
                               "(alpaca or messages) or --imatrix off")
        return None
    # on a GPU in bf16 (a 7B model's forward over MAX_TOKENS is ~30 TFLOP: minutes on a CPU); squares summed in fp64
    device, dtype = ("cuda", torch.bfloat16) if torch.cuda.is_available() else ("cpu", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    columns, tokens = collect(model, batches)
    return Imatrix(columns, source, len(batches), tokens)
