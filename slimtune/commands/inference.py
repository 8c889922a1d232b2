"""What chat and generate share: their outputs checked before the model loads, and JSONL written atomically (their
shared arguments are arguments.inference_args; the run or .gguf file they answer with is
trained.load_for_inference, their sampling settings evaluate.generate.Sampling.from_flags)."""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterable
from pathlib import Path

from .. import outputs
from ..runs.adapter import READS, read_config
from ..runs.checks import check_run


def check_output(args: argparse.Namespace, out: str | Path, flag: str, data: Iterable[str | Path | None] = ()) -> None:
    """Before the model loads: `out` is not the base model, a file of the run or an input (outputs.check)."""
    if str(args.folder).endswith(".gguf"):
        outputs.check(out, flag, args.folder, data)
        return
    check_run(args.folder)
    folder = Path(args.folder)
    runs = [(f"the run's {name}", folder / name) for name in READS]
    outputs.check(out, flag, read_config(folder).model.path, data, reads=runs)


def write_atomic(path: Path, rows: Iterable[dict]) -> None:
    """JSONL written to a temporary file beside `path`, renamed over it at the end: a crash leaves no
    half-written file (generate once wrote 2 of 5 rows and then failed) and an old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
