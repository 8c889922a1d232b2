"""`slimtune config`: the resolved config as YAML, or with --explain every key's reference."""
from __future__ import annotations

import argparse

from .. import config as config_mod
from .options import config_from


def run(args: argparse.Namespace) -> int:
    """The resolved config as YAML (as `train --print-config`), or with --explain the key reference."""
    if args.explain:
        print(config_mod.explain())
    else:
        print(config_mod.dump(config_from(args)), end="")
    return 0
