"""Run logs: metrics.jsonl (one JSON object per line) and the progress bar."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


class MetricsLog:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("a", encoding="utf-8")

    def write(self, **row) -> None:
        row.setdefault("time", round(time.time(), 3))
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def progress(total: int, enabled: bool = True):
    """A bar showing step/total, elapsed and remaining time; loss and tokens/s go in its postfix."""
    return tqdm(total=total, desc="train", unit="step", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)
