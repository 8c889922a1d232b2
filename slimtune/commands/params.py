"""`slimtune params`: trainable / total parameters of a config's method, built on the meta device."""
from __future__ import annotations

import argparse

from ..methods import count_on_meta
from .options import allow_code, config_from


def run(args: argparse.Namespace) -> int:
    cfg = config_from(args)
    allow_code(args, cfg)
    trainable, total = count_on_meta(cfg.model.path, cfg.method, cfg.model.trust_remote_code)
    print(f"method {cfg.method.name}: trainable params: {trainable:,} || all params: {total:,} || "
          f"trainable%: {100 * trainable / total:.4f}")
    return 0
