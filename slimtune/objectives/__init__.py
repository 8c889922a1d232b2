"""What a step optimises beyond the answers' next-token loss: the preference losses (losses.py) and the answer
log-probabilities they read (logps.py); GRPO's advantages and clipped loss (grpo.py) and its rewards (rewards.py).

The training steps (engine/preference_step.py, engine/grpo_step.py) compute the log-probabilities and call these;
nothing here knows the loop."""
from __future__ import annotations

import torch

from ..config.fields import PreferenceConfig
from . import losses
from .losses import Logps

PAIRED = ("dpo", "ipo", "simpo", "orpo")  # records of prompt, chosen, rejected
UNPAIRED = ("kto",)  # records of prompt, answer, desirable or not
OBJECTIVES = PAIRED + UNPAIRED
REFERENCE_FREE = ("simpo", "orpo")  # no reference model: nothing to switch off, precompute or copy


def needs_reference(objective: str) -> bool:
    return objective in OBJECTIVES and objective not in REFERENCE_FREE


def loss(objective: str, lp: Logps, pref: PreferenceConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(mean loss of the micro-batch, per-record metrics) of `objective` with the knobs of `pref` (the
    config's preference section)."""
    if objective == "dpo":
        return losses.dpo(lp, pref.beta, pref.label_smoothing)
    if objective == "ipo":
        return losses.ipo(lp, pref.beta)
    if objective == "simpo":
        return losses.simpo(lp, pref.beta, pref.simpo_gamma)
    if objective == "orpo":
        return losses.orpo(lp, pref.orpo_lambda)
    if objective == "kto":
        return losses.kto(lp, pref.beta, pref.kto_desirable_weight, pref.kto_undesirable_weight)
    raise ValueError(f"train.objective={objective}: not a preference objective (one of {', '.join(OBJECTIVES)})")


__all__ = ["Logps", "OBJECTIVES", "PAIRED", "REFERENCE_FREE", "UNPAIRED", "loss", "needs_reference"]
