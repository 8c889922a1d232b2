"""The eval before training, kept across runs: runs that differ only in what training changes (lr, steps,
schedule...) start from the same model, so they measure the same step-0 scores.

A result is keyed by everything the step-0 scores depend on: the model's files (names, sizes, modification
times), the encoded held-out records (template, system prompt and max_len are in their token ids), the
method and seed (prompt methods start from a random prompt), precision, device, micro-batch size and the
eval settings. It lives in a `.slimtune-cache` folder beside the run folder; slimtune only ever writes
its own files there.
"""
from __future__ import annotations

import hashlib
import json
import os
from array import array
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .. import models

if TYPE_CHECKING:
    from ..config import Config
    from ..data.encode import Encoded

FOLDER = ".slimtune-cache"
VERSION = 1  # bump when what an eval computes changes


def _model_files(path: str) -> list:
    try:
        root = Path(models.resolve(path))
    except Exception:  # an unresolvable path: no cache rather than a failed run
        return [str(path), "unresolved"]
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return [[str(p.relative_to(root) if p != root else p.name), p.stat().st_size, p.stat().st_mtime_ns]
            for p in files]


def key(cfg: Config, records: list[Encoded], device: str, settings: dict) -> str:
    """A hex digest of what the eval before training depends on."""
    h = hashlib.sha256()
    for r in records:
        h.update(array("q", r.input_ids).tobytes() + b"|" + array("q", r.labels).tobytes() + b"\n")
    tc = cfg.train
    parts = {"version": VERSION, "model": _model_files(cfg.model.path), "records": h.hexdigest(),
             "method": asdict(cfg.method), "seed": tc.seed, "precision": tc.precision,
             "device": str(device).split(":")[0], "micro_batch_size": tc.micro_batch_size, "loss": tc.loss,
             "settings": settings}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def path(output_dir: str | Path, digest: str) -> Path:
    return Path(output_dir).resolve().parent / FOLDER / f"eval-before-{digest}.json"


def load(file: Path) -> dict | None:
    """The stored scores and predictions, or None (missing or unreadable: evaluate again)."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def store(file: Path, scores: dict, predictions: list[dict]) -> None:
    """Written to a temporary file and renamed: a killed run leaves no half-written entry. A cache that
    can't be written (read-only folder) is skipped: it must never stop a run."""
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"scores": scores, "predictions": predictions}, ensure_ascii=False),
                       encoding="utf-8")
        os.replace(tmp, file)
    except OSError:
        pass
