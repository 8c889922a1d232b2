"""Preference accuracy and mean margin on held-out pairs: during a preference run (every eval the run makes) and
for any run afterwards (`slimtune eval RUN --data pairs.jsonl`, SFT runs too).

A pair counts as right when the model's implicit reward of the chosen answer beats the rejected one's:
beta x (log-ratio to the reference) for dpo, ipo and kto runs, beta x the mean log-probability for simpo, lambda x
it for orpo. An SFT run is scored as DPO would score it, against its base model (the adapter switched off, or the
base loaded beside it for full fine-tuning), with preference.beta."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .. import models, outputs
from ..config import Config, ConfigError
from ..data.collate import pad_id
from ..data.pairs import EncodedPair
from ..engine import reference as ref_mod
from ..engine.pair_logps import Item
from ..engine.precision import base_dtype_name
from ..engine.preference_step import PairObjective, evaluate, items
from ..runs.adapter import READS, read_config
from ..trained import load_run
from ..methods.base import is_peft
from ..objectives import OBJECTIVES, needs_reference
from .report import SCORES, write_files



@dataclass
class PairReport:
    """Held-out preference scores, shaped as evaluate/report.Report is for the loop (row, scores, write)."""
    scores: dict
    predictions: list[dict] = field(default_factory=list)  # none: nothing is generated

    def row(self) -> dict:
        """The logged scores as metrics.jsonl keys: eval_loss, eval_rewards/accuracy, eval_rewards/margins..."""
        return {k if k.startswith("eval_") else f"eval_{k}": v for k, v in self.scores.items()
                if k not in ("records", "objective", "reference", "step", "model", "data", "trained_with")}

    def summary(self) -> str:
        s = self.scores
        return (f"eval: {s['records']} pairs ({s['objective']}, reference {s['reference']}): preference accuracy "
                f"{s['rewards/accuracy']:.3f}, mean margin {s['rewards/margins']:.4f}, loss {s['eval_loss']:.4f}")

    def write(self, folder: str | Path) -> Path:
        return write_files(folder, self.scores, self.predictions)


def score(model: torch.nn.Module, objective: PairObjective, records: list[Item], batch_size: int, device: str,
          context: Callable = contextlib.nullcontext) -> PairReport:
    """The objective's held-out loss, preference accuracy (rewards/accuracy) and mean margin (rewards/margins)."""
    got = evaluate(model, objective, records, batch_size, device, context)
    got["eval_loss"] = got.pop("loss")
    return PairReport({"objective": objective.objective, "reference": objective.reference, **got})


class InTraining:
    """The loop's evaluate hook for a preference run: (model, context, step) -> PairReport of `records`."""

    def __init__(self, objective: PairObjective, records: list[Item], batch_size: int, device: str):
        self.objective, self.records, self.batch_size, self.device = objective, records, batch_size, device

    def __call__(self, model: torch.nn.Module, context: Callable = contextlib.nullcontext,
                 step: int | None = None) -> PairReport:
        return score(model, self.objective, self.records, self.batch_size, self.device, context)


def reference_for(model: torch.nn.Module, cfg: Config, device: str) -> tuple[str, Callable | None]:
    """(its name, the reference callable) a finished run is scored against: none for simpo/orpo runs, the adapter
    switched off for adapter runs, else the base model loaded beside the trained one."""
    objective = cfg.train.objective if cfg.train.objective in OBJECTIVES else "dpo"
    if not needs_reference(objective):
        return "none", None
    if cfg.method.name in ref_mod.PROMPT_METHODS:
        raise ConfigError(f"eval: method.name={cfg.method.name}: pairs are scored from the decoder's hidden states, "
                          "which the virtual tokens of prompt methods bypass")
    if is_peft(model) and cfg.method.name != "pissa":
        return "adapter_off", ref_mod.AdapterOff()
    base, _ = models.load(cfg.model.path, base_dtype_name(cfg, device), cfg.model.trust_remote_code, device)
    return "base model", ref_mod.Copy(base, deep=False)


def main(folder: str, data: str, read_pairs: Callable, *, output: str | None = None, batch_size: int = 8,
         device: str = "cpu", trust_remote_code: bool = False, log: Callable[[str], None] = print) -> PairReport:
    """`slimtune eval RUN --data pairs.jsonl`: preference accuracy and mean margin of any run (an SFT run is
    scored as DPO with its preference.beta) on held-out pairs; scores.json into `output` (default RUN/eval-<data>).
    read_pairs: (cfg, tokenizer, path) -> the encoded pairs of the file."""
    out = Path(output) if output else Path(folder) / f"eval-{Path(data).stem}"
    outputs.check(out, "eval --output", read_config(folder).model.path, [data], files=[SCORES],
                  reads=[(f"the run's {name}", Path(folder) / name) for name in READS])
    model, tokenizer, cfg = load_run(folder, device, trust_remote_code=trust_remote_code)
    pairs: list[EncodedPair] = read_pairs(cfg, tokenizer, data)
    if not pairs:
        raise ConfigError(f"{data}: no preference pairs to score")
    objective = cfg.train.objective if cfg.train.objective in OBJECTIVES else "dpo"
    name, ref = reference_for(model, cfg, device)
    scorer = PairObjective(objective, cfg.preference, name, pad_id(tokenizer), ref=ref)
    report = score(model, scorer, items(pairs, objective, "eval"), batch_size, device)
    report.scores = {"model": str(folder), "data": str(data), "trained_with": cfg.train.objective,
                     **report.scores}
    log(report.summary())
    report.write(out)
    log(f"wrote {out / SCORES}")
    return report


__all__ = ["InTraining", "PairReport", "main", "reference_for", "score"]
