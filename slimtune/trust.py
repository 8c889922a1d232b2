"""When a model folder's own Python (an `auto_map` in its config.json) may run: one rule for every command
and the web app.

The person at the command line decides: `--trust-remote-code`, a `model.trust_remote_code=true` override, or
a config file of their own. A run folder's config.yaml may come from anywhere (a downloaded run, a shared
drive): `slimtune train RUN/config.yaml --resume`, the web app's Resume, chat, eval, merge and export read it,
and its `model.trust_remote_code: true` asks for the code but never switches it on.
"""
from __future__ import annotations

from pathlib import Path

from . import config as config_mod
from . import models
from .runs import checkpoint, ownership
from .methods.parts import PARTS

FLAG = "--trust-remote-code"
# what `slimtune train` leaves beside a run's config.yaml: any one of them marks the file as a run folder's
RUN_MARKS = (ownership.MANIFEST, "adapter_config.json", PARTS, checkpoint.ROOT, "metrics.jsonl")


def is_run_config(path: str | Path, output_dir: str | None = None) -> bool:
    """Whether a config file is a run folder's own config.yaml (or a checkpoint's): a config.yaml with a run's
    files beside it, or the one in the train.output_dir it names (where `slimtune train` writes it)."""
    folder = Path(path).resolve().parent
    if Path(path).name != "config.yaml":
        return False
    return folder.parent.name == checkpoint.ROOT or any((folder / name).exists() for name in RUN_MARKS) or \
        (output_dir is not None and Path(output_dir).resolve() == folder)


def said(overrides: list[str], flag: bool = False) -> bool:
    """Whether the command line switches the code on: the flag, or a model.trust_remote_code=true override."""
    mine = [x for x in overrides if x.split("=", 1)[0].strip() == "model.trust_remote_code"]
    return bool(flag) or (bool(mine) and config_mod.load(None, mine).model.trust_remote_code)


def decide(cfg: config_mod.Config, source: str | Path | None, user: bool, run: bool | None = None,
           how: str = f"pass {FLAG}") -> bool:
    """The trust_remote_code a command runs with: True when the user said so (`user`: the flag or an
    override, see said()), the config's own value when `source` is the user's own config file (None: built
    in code), and False for a run folder's config.yaml (run: None = found by is_run_config), which is
    refused, one line saying `how` to allow it, where it asks for code the model folder has."""
    if user or not cfg.model.trust_remote_code:
        return bool(user)
    if source is None or not (is_run_config(source, cfg.train.output_dir) if run is None else run):
        return True
    p = models.resolve(cfg.model.path)
    found = models.custom_code(p) if p.is_dir() else []
    if found:
        raise models.UnsafeFileError(f"{source}: model.trust_remote_code: true, and {found[0]}; a run folder's "
                                     f"config.yaml cannot switch on the model's own code: {how} if you trust {p}")
    return False  # nothing there to run: the value changes nothing
