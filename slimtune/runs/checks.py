"""Whether a folder is a finished run, checked before any model loads (chat, generate, eval, merge, the web
app): a folder that never trained, or stopped before saving its adapter, is named for what it is (with the
checkpoint to use instead), not as a missing file."""
from __future__ import annotations

from pathlib import Path

from ..errors import MissingFileError
from . import checkpoint
from .adapter import parts_saved


def check_run(folder: str | Path) -> None:
    """Before any model loads: a run folder that never trained, or stopped before saving its adapter, is
    named for what it is (with the checkpoint to use instead), not as a missing file."""
    out = Path(folder)
    if not out.is_dir():
        raise MissingFileError(f"{out}: no such run folder (give the train.output_dir of a `slimtune train` run)")
    if (out / "adapter_config.json").is_file() or parts_saved(out):
        return
    last = checkpoint.latest(out)
    if last is not None:
        raise MissingFileError(f"{out}: training stopped before saving the final adapter; its newest checkpoint is "
                               f"{last}: pass that folder instead, or `slimtune train {out / 'config.yaml'} "
                               "--resume` to finish the run")
    if (out / "config.yaml").is_file() and not (out / "metrics.jsonl").is_file():
        raise MissingFileError(f"training never started in {out} (no metrics.jsonl, no checkpoint): its config.yaml "
                               "was written, then the run was refused or stopped before its first step (see "
                               f"that command's error); run `slimtune train {out / 'config.yaml'}` first")
    if (out / "config.yaml").is_file():
        raise MissingFileError(f"{out}: training started (metrics.jsonl) but saved no adapter and no checkpoint; "
                               f"run `slimtune train {out / 'config.yaml'} --overwrite` again")
    raise MissingFileError(f"{out}: not a slimtune run folder (no config.yaml, adapter or checkpoint)")
