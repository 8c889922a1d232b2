"""The reference model of DPO, IPO and KTO, without a second copy where one can be avoided.

- adapter_off: the trained model itself with its adapter switched off (peft's disable_adapter), which is the base
  model exactly: the adapter adds its update only while enabled;
- precomputed: the reference log-probabilities of every record, computed once before the first step with the
  model as loaded and kept in the run folder (REFERENCE_FILE), which a resume reads back;
- copy: a frozen copy of the model as it was before the first step (twice the weights' memory).
simpo and orpo have no reference. `resolve` picks one for train.reference=auto and refuses the pairs that make
no sense, each in one line."""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..config import PROMPT_METHODS, Config, ConfigError
from ..methods.base import is_peft
from ..objectives import OBJECTIVES, needs_reference
from .pair_logps import Item, collate_pairs, sequence_logps

REFERENCE_FILE = "reference_logps.safetensors"
CHOICES = ("auto", "adapter_off", "precomputed", "copy")
ADAPTER_FREE = ("full", "freeze", "bitfit")  # they train the model's own weights: there is no adapter to switch off


def resolve(cfg: Config) -> str:
    """The reference train.objective and train.reference ask for with method.name ("none" for simpo, orpo and
    sft), or a one-line ConfigError saying why the combination cannot run and what to set instead."""
    objective, asked, method = cfg.train.objective, cfg.train.reference, cfg.method.name
    if objective not in OBJECTIVES:
        return "none"
    if asked not in CHOICES:
        raise ConfigError(f"train.reference={asked}: not one of {', '.join(CHOICES)}")
    if method in PROMPT_METHODS:
        raise ConfigError(f"train.objective={objective} with method.name={method}: the preference step reads the "
                          "decoder's hidden states, which the virtual tokens of prompt methods bypass; use lora")
    if not needs_reference(objective):
        if asked != "auto":
            raise ConfigError(f"train.reference={asked}: train.objective={objective} has no reference model; "
                              "leave train.reference=auto")
        return "none"
    if asked == "adapter_off" and method in ADAPTER_FREE:
        raise ConfigError(f"train.reference=adapter_off with method.name={method}: {method} trains the model's own "
                          "weights, there is no adapter to switch off; use train.reference=precomputed or copy")
    if asked == "adapter_off" and method == "pissa":
        raise ConfigError("train.reference=adapter_off with method.name=pissa: PiSSA moves each weight's principal "
                          "part into the adapter, so with it off the model is not the base; use "
                          "train.reference=precomputed or copy")
    if asked != "auto":
        return asked
    return "precomputed" if method in ADAPTER_FREE or method == "pissa" else "adapter_off"


@contextlib.contextmanager
def _frozen_pass(model: torch.nn.Module):
    """No gradients, and eval mode (no dropout, no RNG drawn), put back as it was after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


class AdapterOff:
    """The same model with its adapter switched off."""

    def __call__(self, model: torch.nn.Module, items: list[Item], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if not is_peft(model):
            raise ConfigError("train.reference=adapter_off: the model holds no peft adapter to switch off; use "
                              "train.reference=precomputed or copy")
        with _frozen_pass(model), model.disable_adapter():
            logps, _ = sequence_logps(model, batch)
        return _halves(logps)


class Copy:
    """A frozen copy of the model as it was when made (deep=False: `model` itself, loaded apart for this)."""

    def __init__(self, model: torch.nn.Module, deep: bool = True):
        self.model = (copy.deepcopy(model) if deep else model).eval().requires_grad_(False)

    def __call__(self, model: torch.nn.Module, items: list[Item], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logps, _ = sequence_logps(self.model, batch)
        return _halves(logps)


class Precomputed:
    """Log-probabilities computed once, looked up by each record's split and index."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __call__(self, model: torch.nn.Module, items: list[Item], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = batch["input_ids"].device
        return tuple(torch.stack([self.tensors[f"{i.split}.{side}"][i.index] for i in items]).to(device)
                     for side in ("chosen", "rejected"))


def _halves(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = logps.shape[0] // 2
    return logps[:n], logps[n:]


def compute(model: torch.nn.Module, splits: dict[str, list[Item]], pad: int, device: str, batch_size: int,
            context: Callable = contextlib.nullcontext) -> dict[str, torch.Tensor]:
    """{"train.chosen": (N,), "train.rejected": (N,), "eval.chosen": ...}: the model's answer log-probabilities of
    every record, fp32 on the CPU, in eval mode without gradients."""
    out = {}
    with _frozen_pass(model):
        for split, items in splits.items():
            sides = [[], []]
            for start in range(0, len(items), batch_size):
                with context():
                    logps, _ = sequence_logps(model, collate_pairs(items[start:start + batch_size], pad, device))
                for side, half in zip(sides, _halves(logps.float().cpu())):
                    side.append(half)
            for name, side in zip(("chosen", "rejected"), sides):
                out[f"{split}.{name}"] = torch.cat(side) if side else torch.zeros(0)
    return out


def load_or_compute(path: Path, digest: str, compute_fn: Callable[[], dict], write: bool,
                    log: Callable[[str], None] = print) -> Precomputed:
    """The run folder's precomputed reference when it was made for these records (`digest`), else computed now
    (and written, on the rank that owns the folder)."""
    if path.is_file():
        try:
            tensors = load_file(path)
            with safe_open(path, "pt") as fh:
                made_for = (fh.metadata() or {}).get("records_sha256")
        except Exception:  # a truncated or foreign file: computed again below
            tensors, made_for = None, None
        if tensors is not None and made_for == digest:
            log(f"reference log-probabilities read from {path}")
            return Precomputed(tensors)
    log("computing the reference log-probabilities of every record (once, before the first step)")
    tensors = compute_fn()
    if write:
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        save_file(tensors, tmp, metadata={"records_sha256": digest})
        tmp.replace(path)
    return Precomputed(tensors)

