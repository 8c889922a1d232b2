"""Preference accuracy and mean margin on held-out pairs: during a preference run (every eval the run makes) and
for any run afterwards (`slimtune eval RUN --data pairs.jsonl`, SFT runs too).

A pair counts as right when the model's implicit reward of the chosen answer beats the rejected one's:
beta x (log-ratio to the reference) for dpo, ipo and kto runs, beta x the mean log-probability for simpo, lambda x
it for orpo. An SFT run is scored as DPO would score it, against its base model (the adapter switched off, or the
base loaded beside it for full fine-tuning), with preference.beta."""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..engine.log import strict_json
from ..engine.preference_step import PairObjective, evaluate
from ..engine.pair_logps import Item

SCORES = "scores.json"


@dataclass
class PairReport:
    """Held-out preference scores, shaped as evaluate/report.Report is for the loop (row, scores, write)."""
    scores: dict
    predictions: list[dict] = field(default_factory=list)  # none: nothing is generated

    def row(self) -> dict:
        """The logged scores as metrics.jsonl keys: eval_loss, eval_rewards/accuracy, eval_rewards/margins..."""
        return {k if k.startswith("eval_") else f"eval_{k}": v for k, v in self.scores.items()
                if k not in ("records", "objective", "reference", "step")}

    def summary(self) -> str:
        s = self.scores
        return (f"eval: {s['records']} pairs ({s['objective']}, reference {s['reference']}): preference accuracy "
                f"{s['rewards/accuracy']:.3f}, mean margin {s['rewards/margins']:.4f}, loss {s['eval_loss']:.4f}")

    def write(self, folder: str | Path) -> Path:
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        (out / SCORES).write_text(json.dumps(strict_json(self.scores), indent=2) + "\n", encoding="utf-8")
        return out


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


__all__ = ["InTraining", "PairReport", "score"]
