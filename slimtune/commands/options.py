"""The config read from a verb's command line (the arguments themselves are in arguments.py)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import config as config_mod
from .. import trust


def _files(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """(YAML files, dotted overrides) among the command line's items."""
    items = ([args.config] if args.config else []) + list(args.overrides)
    files = [x for x in items if "=" not in x or Path(x).is_file()]
    return files, [x for x in items if x not in files]


def config_from(args: argparse.Namespace) -> config_mod.Config:
    """The config from the command line; items may come in any order around the flags: the one without
    "=" (or that names an existing file) is the YAML, the others dotted overrides. Warnings about method.*
    keys that do nothing go to stderr."""
    files, overrides = _files(args)
    if len(files) > 1:
        raise config_mod.ConfigError(f"two config files given ({files[0]}, {files[1]}); give one YAML file, then "
                                     "dotted overrides such as train.lr=2e-4")
    if args.model:
        overrides.append(f"model.path={args.model}")
    cfg = config_mod.load(files[0] if files else None, overrides)
    for text in config_mod.unused(cfg):
        print(f"slimtune {args.command}: warning: {text}", file=sys.stderr)
    return cfg


def allow_code(args: argparse.Namespace, cfg: config_mod.Config) -> None:
    """Set cfg.model.trust_remote_code as this command line allows it (slimtune/trust.py): --trust-remote-code
    or a model.trust_remote_code=true override switch it on; a run folder's config.yaml cannot."""
    files, overrides = _files(args)
    if trust.decide(cfg, files[0] if files else None, trust.said(overrides, getattr(args, "trust_remote_code", False))):
        cfg.model.trust_remote_code = True
