"""Arguments several verbs share, and the config read from a verb's command line."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import config as config_mod

EPILOG = "Config overrides use dotted names: slimtune train cfg.yaml train.lr=2e-4 method.r=16"
TRUST_HELP = ("run the model folder's own Python (auto_map in its config.json); only when you trust it. A run "
              "folder's config.yaml never switches this on")


def gpus(text: str) -> int:
    """--gpus: a count of GPUs, at least 1 (0, the default, means train.gpus)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs (1 or more), got {text!r}")
    return n


def add_config(p: argparse.ArgumentParser, config_help: str | None = None, overrides_help: str | None = None) -> None:
    """The YAML file, dotted overrides and --model that config_from() reads."""
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--model", help="same as model.path=...")


def config_from(args) -> config_mod.Config:
    """The config from the command line; items may come in any order around the flags: the one without
    "=" (or that names an existing file) is the YAML, the others dotted overrides. Warnings about method.*
    keys that do nothing go to stderr."""
    items = ([args.config] if args.config else []) + list(args.overrides)
    files = [x for x in items if "=" not in x or Path(x).is_file()]
    if len(files) > 1:
        raise config_mod.ConfigError(f"two config files given ({files[0]}, {files[1]}); give one YAML file, then "
                                     "dotted overrides such as train.lr=2e-4")
    overrides = [x for x in items if x not in files]
    if args.model:
        overrides.append(f"model.path={args.model}")
    cfg = config_mod.load(files[0] if files else None, overrides)
    for text in config_mod.unused(cfg):
        print(f"slimtune {args.command}: warning: {text}", file=sys.stderr)
    return cfg
