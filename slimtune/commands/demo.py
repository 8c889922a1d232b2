"""`slimtune demo`: the end-to-end demo on the embedded model and real data."""
from __future__ import annotations

from pathlib import Path

from ..demo import main as demo_main


def add(d) -> None:
    d.add_argument("--output-dir", default="demo_out")
    d.add_argument("--steps", type=int, default=0, help="override the demo's step count")


def run(args) -> int:
    return demo_main(Path(args.output_dir), args.steps)
