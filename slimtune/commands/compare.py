"""`slimtune compare`: several methods trained and scored on the same data, seed and budget."""
from __future__ import annotations

import argparse
import sys

from ..compare import compare
from ..compare.runner import Interrupted


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    objectives = [m.strip() for m in args.objectives.split(",") if m.strip()] if args.objectives else None
    try:
        rows = compare(args.config, methods, args.overrides, args.output, objectives=objectives)
    except Interrupted as err:
        print(f"slimtune compare: {err}; run the same command again to go on (finished rows are kept)",
              file=sys.stderr)
        return 130
    failed = [r["label"] for r in rows if r["status"] != "done"]
    if failed:  # a row that cannot run here is an answer too (its reason is in the table), not an error
        print(f"slimtune compare: {len(failed)} of {len(rows)} rows failed: {', '.join(failed)}", file=sys.stderr)
    return 0
