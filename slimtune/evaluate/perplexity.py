"""Loss on answer tokens: summed cross-entropy over every trained token, divided by their count
(engine/loss.eval_loss, the loss training computes), and the held-out evaluation a training run gets when
it generates nothing."""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from ..engine.loss import eval_loss
from .report import Report

if TYPE_CHECKING:
    from torch import nn

    from ..data.encode import Encoded


def loss_eval(held: list[Encoded], pad: int, batch_size: int, device: str,
              chunked: bool) -> Callable[[nn.Module, Callable[[], AbstractContextManager], int], Report]:
    """fit's `evaluate` when only the loss is wanted: (model, context, step) -> Report of `held`'s loss,
    chunked as the steps compute it."""
    def evaluate(model: nn.Module, context: Callable[[], AbstractContextManager], step: int) -> Report:
        return Report(eval_loss(model, held, pad, batch_size, device, context, chunked))
    return evaluate
