"""Loss on answer tokens: summed cross-entropy over every trained token, divided by their count
(engine/loss.eval_loss, the loss training computes), and the held-out evaluation a training run gets when
it generates nothing."""
from __future__ import annotations

from ..engine.loss import eval_loss
from .report import Report


def loss_eval(held, pad: int, batch_size: int, device: str, chunked: bool):
    """fit's `evaluate` when only the loss is wanted: (model, context, step) -> Report of `held`'s loss,
    chunked as the steps compute it."""
    def evaluate(model, context, step: int) -> Report:
        return Report(eval_loss(model, held, pad, batch_size, device, context, chunked))
    return evaluate
