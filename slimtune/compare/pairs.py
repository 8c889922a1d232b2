"""A compare on preference pairs: every row, sft included, is scored on the same held-out pairs by `slimtune eval
RUN --data heldout.jsonl` (evaluate/preference.py: preference accuracy and mean margin; an sft row as dpo
would score it, against its base model, with preference.beta). An sft row trains on the chosen answers of the
same training pairs (files written here), unless its overrides give it its own data.train."""
from __future__ import annotations

import json
from pathlib import Path

from ..config import Config, DataConfig
from ..data import DataError, pref_read
from ..data.preference import read_split

HELDOUT = "heldout.jsonl"  # the held-out pairs, as read (every row's test)
SFT_FILES = ("sft-train.jsonl", "sft-heldout.jsonl")  # the chosen answers of the training and held-out pairs


def holds_pairs(data: DataConfig) -> bool:
    """Whether data.train's first record is a preference pair (chosen and rejected answers)."""
    try:
        kind, _ = pref_read.read(data.train, "auto", limit=1, log=lambda *a: None)
    except (DataError, OSError):
        return False  # not preference data: the answers reader says what is wrong with it, if anything
    return kind == "pairs"


def own_data(overrides: list[str]) -> bool:
    """Whether a row's overrides name its own training data."""
    return any(o.startswith("data.train=") for o in overrides)


def write_heldout(cfg: Config, out: Path) -> Path:
    """The held-out pairs every row is scored on (data.eval, or those train's split holds out), and the sft
    files: the chosen answers of the training and held-out pairs as messages."""
    _, train, held = read_split(cfg.data, [] if cfg.data.on_bad_record == "skip" else None, lambda *a: None)
    path = Path(cfg.data.eval) if cfg.data.eval else out / HELDOUT
    if not cfg.data.eval:
        _write(path, [r.raw for r in held])
    for name, records in zip(SFT_FILES, (train, held)):
        _write(out / name, [{"messages": [*r.prompt, {"role": "assistant", "content": r.chosen}]} for r in records])
    return path


def _write(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def sft_overrides(out: Path) -> list[str]:
    """An sft row's data on pairs: the chosen answers, split as the preference rows split the pairs."""
    train, held = (out / name for name in SFT_FILES)
    return [f"data.train={train}", f"data.eval={held}", "data.format=auto"]


def scores(got: dict) -> dict:
    """The table's preference numbers from a scores.json of evaluate/preference.py."""
    return {"pref_accuracy": got.get("rewards/accuracy"), "pref_margin": got.get("rewards/margins"),
            "scored_as": got.get("objective"), "reference": got.get("reference")}
