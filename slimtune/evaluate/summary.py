"""What a finished run leaves for a reader beside its adapter: summary.json (the run's result: steps,
losses, timings, peak memory, parameter counts) and loss.png (train and eval loss over the steps of
metrics.jsonl), so a user can look rather than read logs, and `slimtune compare` reads one file."""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..runs.metrics_log import read_metrics
from ..methods import count_parameters
from .plots import loss_png  # matplotlib itself loads inside loss_png: a missing one is reported there

if TYPE_CHECKING:
    from torch import nn


def write(out: Path, result: dict, model: nn.Module, log: Callable[[str], None] = print) -> None:
    """summary.json and loss.png into the run folder. Never fails a run that trained: a problem here (no
    matplotlib, a full disk) is reported and the run's own files stand."""
    try:
        trainable, total = count_parameters(model)
        summary = dict(result, trainable_params=trainable, total_params=total)
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
    except Exception as err:  # noqa: BLE001 - reported, never raised (see above)
        log(f"warning: could not write {out / 'summary.json'}: {type(err).__name__}: {err}")
    try:
        loss_png(read_metrics(out / "metrics.jsonl"), out / "loss.png", title=f"{out.name}: loss")
        log(f"wrote {out / 'loss.png'}")
    except Exception as err:  # noqa: BLE001 - as above
        hint = " (pip install matplotlib)" if isinstance(err, ImportError) else ""
        log(f"warning: could not draw {out / 'loss.png'}: {type(err).__name__}: {err}{hint}")
