"""AdamW over the trainable parameters and a warm-up + cosine/linear/constant learning-rate schedule."""
from __future__ import annotations

import math

import torch

from ..methods.base import MethodError
from ..config import TrainConfig


def build_optimizer(model: torch.nn.Module, cfg_train: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise MethodError("no parameter of the model requires a gradient: apply a method first (slimtune.apply_method) "
                          "or set requires_grad on the parameters to train")
    # fused: one kernel for every parameter's update on CUDA (a launch per tensor otherwise)
    fused = all(p.is_cuda and p.dtype.is_floating_point for p in params)
    return torch.optim.AdamW(params, lr=cfg_train.lr, weight_decay=cfg_train.weight_decay, eps=cfg_train.adam_eps,
                             fused=fused or None)


def lr_factor(step: int, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(optimizer: torch.optim.Optimizer, total: int,
                    cfg_train: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total, cfg_train.warmup_steps, cfg_train.scheduler))
