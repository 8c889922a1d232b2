"""GRPO's arithmetic on tensors: group-relative advantages from rewards, and the clipped policy loss with its
three normalisations (grpo, dr_grpo, dapo), the KL to the reference and the numbers a run logs.

Conventions follow TRL's GRPOTrainer (trl 1.15): rewards of a group of G completions of one prompt are centred
on the group's mean and divided by its (unbiased) standard deviation + 1e-4 (scale_rewards=group), by the whole
batch's (batch) or not at all (none, as Dr. GRPO recommends); the KL is the k3 estimator
exp(ref - logp) - (ref - logp) - 1 per token; the ratio is clipped to [1 - epsilon, 1 + epsilon_high]."""
from __future__ import annotations

from dataclasses import dataclass

import torch

STD_EPS = 1e-4  # TRL's: keeps a group of equal rewards at advantage 0 instead of 0/0
LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")


def _groups(rewards: torch.Tensor, group: int) -> torch.Tensor:
    if rewards.dim() != 1 or group < 1 or rewards.numel() % group:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group} completions")
    return rewards.view(-1, group)


def advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """Each completion's reward minus its group's mean, scaled per `scale` (group | batch | none)."""
    grouped = _groups(rewards.float(), group)
    centred = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = grouped.std(dim=1, keepdim=True).expand_as(grouped).reshape(-1) if group > 1 else \
            torch.zeros_like(centred)
    elif scale == "batch":
        std = rewards.float().std().expand_as(centred) if rewards.numel() > 1 else torch.zeros_like(centred)
    else:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALES)}, not {scale!r}")
    return centred / (std + STD_EPS)


def zero_variance_share(rewards: torch.Tensor, group: int) -> float:
    """The share of groups whose completions all got the same reward: they teach nothing (advantage 0)."""
    grouped = _groups(rewards.float(), group)
    if group == 1:
        return 1.0
    same = torch.isclose(grouped.std(dim=1), torch.zeros(grouped.shape[0]))
    return float(same.float().mean())


@dataclass(frozen=True)
class LossConfig:
    loss_type: str = "dapo"  # how token losses are averaged: grpo (per sequence, then over sequences) | dr_grpo
    # (sum over a constant: sequences x max_new_tokens) | dapo (sum over the tokens of the whole step)
    epsilon: float = 0.2  # lower clip: the ratio may fall to 1 - epsilon
    epsilon_high: float = 0.2  # upper clip: the ratio may rise to 1 + epsilon_high (DAPO: 0.28)
    beta: float = 0.0  # weight of the KL to the reference (0: no reference pass)
    max_new_tokens: int = 256  # dr_grpo's constant


@dataclass
class LossParts:
    loss: torch.Tensor  # what backward runs on, already divided for this micro-batch's share of the step
    kl: float  # mean per-token KL to the reference over completion tokens (0 when beta is 0)
    clipped: float  # share of completion tokens whose ratio was clipped (low or high, where it mattered)
    tokens: int  # completion tokens in this micro-batch


def policy_loss(logps: torch.Tensor, old_logps: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor,
                cfg: LossConfig, ref_logps: torch.Tensor | None = None, step_tokens: int | None = None,
                step_sequences: int | None = None) -> LossParts:
    """The clipped surrogate of one micro-batch: logps/old_logps/ref_logps/mask are [sequences, completion
    tokens], adv is [sequences]. step_tokens (dapo) and step_sequences (grpo, dr_grpo) are the counts over the
    whole optimizer step, so micro-batches' losses sum to the step's loss; each defaults to this micro-batch's."""
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = torch.clamp(ratio, 1 - cfg.epsilon, 1 + cfg.epsilon_high)
    a = adv.to(logps.dtype).unsqueeze(1)
    per_token = -torch.min(ratio * a, clipped_ratio * a)
    kl = torch.zeros_like(per_token)
    if cfg.beta:
        if ref_logps is None:
            raise ValueError("grpo.beta > 0 needs the reference log-probabilities")
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + cfg.beta * kl
    n_seq = step_sequences or logps.shape[0]
    if cfg.loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / n_seq
    elif cfg.loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (n_seq * cfg.max_new_tokens)
    elif cfg.loss_type == "dapo":
        loss = (per_token * mask).sum() / max(step_tokens or float(mask.sum()), 1.0)
    else:
        raise ValueError(f"grpo.loss_type must be one of {', '.join(LOSS_TYPES)}, not {cfg.loss_type!r}")
    return LossParts(loss, *_logged(ratio, a, kl, mask, cfg))


def _logged(ratio: torch.Tensor, a: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
            cfg: LossConfig) -> tuple[float, float, int]:
    """(mean KL, clipped share, tokens) over the completion tokens, as TRL counts clipping: low where the
    advantage is negative, high where it is positive (the only places the clip changes the loss)."""
    with torch.no_grad():
        tokens = float(mask.sum())
        low = (ratio < 1 - cfg.epsilon) & (a < 0)
        high = (ratio > 1 + cfg.epsilon_high) & (a > 0)
        clipped = float(((low | high).to(mask.dtype) * mask).sum()) / max(tokens, 1.0)
        mean_kl = float((kl * mask).sum()) / max(tokens, 1.0)
    return mean_kl, clipped, int(tokens)
