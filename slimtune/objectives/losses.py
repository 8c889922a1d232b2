"""The preference losses, as pure functions of per-sequence log-probabilities.

Each takes the summed log-probabilities of a micro-batch's answers (`Logps`: the policy's, and where the objective
has one, the reference model's) and returns its mean loss over the micro-batch and per-record metrics (the rows
the loop averages and logs). The formulas and their conventions follow TRL's trainers, each named below:

- dpo: DPOTrainer loss_type="sigmoid"; label_smoothing > 0 is conservative DPO (cDPO).
- ipo: DPOTrainer loss_type="ipo", on length-averaged log-probabilities as TRL computes them for IPO.
- simpo: CPOTrainer loss_type="simpo" (length-averaged, no reference). Our preference.simpo_gamma is the SimPO
  repository's gamma_beta_ratio: the margin is beta * simpo_gamma, where TRL's simpo_gamma is the margin itself
  (TRL simpo_gamma = ours x beta).
- orpo: ORPOTrainer: the chosen answers' mean token NLL minus lambda x log sigmoid(log odds ratio), the odds taken
  of length-averaged log-probabilities.
- kto: KTOTrainer: the reference point is the KL estimate from mismatched pairs (each prompt with another
  record's answer), averaged over the micro-batch, detached and clamped at 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Logps:
    """Summed answer log-probabilities of a micro-batch, one entry per record (B,). For KTO `chosen` is the
    record's own answer and `rejected` the mismatched answer the KL estimate reads; `label` its desirability."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor  # answer tokens of each sequence, for the length-averaged objectives
    rejected_tokens: torch.Tensor
    ref_chosen: torch.Tensor | None = None  # the reference model's, under no_grad
    ref_rejected: torch.Tensor | None = None
    label: torch.Tensor | None = None  # KTO: True for a desirable answer


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, lp: Logps) -> dict[str, torch.Tensor]:
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracy": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": lp.chosen.detach(), "logps/rejected": lp.rejected.detach()}


def _mean(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return logps / tokens.clamp(min=1)


def dpo(lp: Logps, beta: float, label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h), h = (pi_c - ref_c) - (pi_r - ref_r)."""
    chosen, rejected = lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected
    h = chosen - rejected
    losses = -F.logsigmoid(beta * h) * (1 - label_smoothing) - F.logsigmoid(-beta * h) * label_smoothing
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, lp)


def ipo(lp: Logps, beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(h - 1 / (2 beta))^2 with h the log-ratio margin of length-averaged log-probabilities (IPO's tau = beta)."""
    chosen = _mean(lp.chosen, lp.chosen_tokens) - _mean(lp.ref_chosen, lp.chosen_tokens)
    rejected = _mean(lp.rejected, lp.rejected_tokens) - _mean(lp.ref_rejected, lp.rejected_tokens)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, lp)


def simpo(lp: Logps, beta: float, gamma_ratio: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigmoid(beta (avg_c - avg_r - gamma_ratio)); rewards are beta x the length-averaged log-probabilities."""
    chosen, rejected = _mean(lp.chosen, lp.chosen_tokens), _mean(lp.rejected, lp.rejected_tokens)
    losses = -F.logsigmoid(beta * (chosen - rejected - gamma_ratio))
    return losses.mean(), _pair_metrics(beta * chosen, beta * rejected, lp)


def orpo(lp: Logps, lam: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NLL(chosen) - lambda log sigmoid(log odds(avg_c) - log odds(avg_r)), odds(p) = p / (1 - p); the NLL is the
    mean over the micro-batch's chosen answer tokens."""
    chosen, rejected = _mean(lp.chosen, lp.chosen_tokens), _mean(lp.rejected, lp.rejected_tokens)
    # log(1 - e^x) as log(-expm1(x)): exact where x (a mean log-probability) is near 0
    log_odds = (chosen - rejected) - (torch.log(-torch.expm1(chosen)) - torch.log(-torch.expm1(rejected)))
    ratio = F.logsigmoid(log_odds)
    nll = -lp.chosen.sum() / lp.chosen_tokens.sum().clamp(min=1)
    loss = nll - lam * ratio.mean()
    metrics = _pair_metrics(lam * chosen, lam * rejected, lp)
    metrics.update({"sft_loss": nll.detach().expand_as(chosen), "odds_ratio_loss": -ratio.detach(),
                    "log_odds_ratio": log_odds.detach()})
    return loss, metrics


def kto(lp: Logps, beta: float, desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Desirable: w_d (1 - sigmoid(beta (r - z))); undesirable: w_u (1 - sigmoid(beta (z - r))); r the answer's
    log-ratio to the reference, z = max(0, mean over the micro-batch of the mismatched answers' log-ratios)."""
    ratio = lp.chosen - lp.ref_chosen
    kl = (lp.rejected - lp.ref_rejected).mean().detach().clamp(min=0)
    good = lp.label.bool()
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio))))
    rewards = beta * ratio.detach()
    metrics = {"rewards/chosen": rewards[good], "rewards/rejected": rewards[~good],
               "rewards/accuracy": ((rewards > 0) == good).float(), "kl": kl.expand_as(rewards),
               "logps/chosen": lp.chosen.detach()[good], "logps/rejected": lp.chosen.detach()[~good]}
    return losses.mean(), metrics
