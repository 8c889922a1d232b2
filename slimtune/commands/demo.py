"""`slimtune demo`: the end-to-end demo on the embedded model and real data."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..demo import main as demo_main


def run(args: argparse.Namespace) -> int:
    return demo_main(Path(args.output_dir), args.steps)
