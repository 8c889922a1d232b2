"""`slimtune train` on preference records made here (random tokens), as a subprocess a test can kill: the reader
of preference files is replaced by these records. Usage: python pref_train.py CONFIG [train args...]"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).parent)]

from pairs_fixture import random_pairs  # noqa: E402
from slimtune import cli  # noqa: E402
from slimtune.engine import preflight  # noqa: E402
from slimtune.data.pairs import BuiltPairs, PairStats  # noqa: E402


def built(cfg, tokenizer, log) -> BuiltPairs:
    return BuiltPairs(random_pairs(20, seed=21, label=cfg.train.objective == "kto"),
                      random_pairs(4, seed=22, label=cfg.train.objective == "kto"), PairStats(), PairStats())


if __name__ == "__main__":
    preflight.build_pairs = built
    sys.exit(cli.main(["train", *sys.argv[1:]]))
