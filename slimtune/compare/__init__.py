"""`slimtune compare CONFIG --methods lora,dora,... [--objectives sft,dpo,orpo]`: which method (or objective) for
this model, data and machine, answered by training and scoring each one the same way (spec: what runs; runner:
the child processes; pairs: a compare on preference pairs; report, table, page: what comes out)."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .. import outputs
from ..models import pick_device
from . import report, runner
from .spec import Comparison, load


def compare(config_path: str | Path, methods: list[str] | None = None, overrides: list[str] | None = None,
            output: str | Path | None = None, log: Callable[[str], None] = print,
            objectives: list[str] | None = None) -> list[dict]:
    """Run (or go on with) a compare; its rows, as compare.json holds them. objectives: a row per
    train.objective (of each method)."""
    comparison = load(config_path, methods, overrides, objectives)
    runner.check_data(comparison, str(config_path))  # before any row: data no row can train on stops here
    out = Path(output) if output else Path("compare") / Path(config_path).stem
    data = comparison.cfg.data
    outputs.check(out, "compare --output", comparison.cfg.model.path, [data.train, data.eval],
                  files=runner.WRITES)
    rows = runner.run_comparison(comparison, out, log)
    report.write(out, rows, report.meta(comparison, str(config_path), pick_device(comparison.cfg.train.device)), log)
    return rows


__all__ = ["Comparison", "compare", "load"]
