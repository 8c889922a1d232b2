"""`slimtune compare`: several methods trained and scored on the same data, seed and budget."""
from __future__ import annotations

import sys

from ..compare import compare
from ..compare.runner import Interrupted
from .options import EPILOG


def add(cp) -> None:
    cp.epilog = EPILOG
    cp.add_argument("config", help="training config; its optional compare: section lists rows and overrides")
    cp.add_argument("overrides", nargs="*", help="dotted overrides for every row, e.g. train.max_steps=50")
    cp.add_argument("--methods", help="comma-separated rows, e.g. base,lora,dora,freeze,prompt_tuning,full "
                                      "(default: the config's compare.methods; base = the model untrained)")
    cp.add_argument("--output", help="folder for the runs and compare.json/.md/.html (default: "
                                     "compare/<config name>); run again to go on after an interruption")


def run(args) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        rows = compare(args.config, methods, args.overrides, args.output)
    except Interrupted as err:
        print(f"slimtune compare: {err}; run the same command again to go on (finished rows are kept)",
              file=sys.stderr)
        return 130
    failed = [r["label"] for r in rows if r["status"] != "done"]
    if failed:  # a row that cannot run here is an answer too (its reason is in the table), not an error
        print(f"slimtune compare: {len(failed)} of {len(rows)} rows failed: {', '.join(failed)}", file=sys.stderr)
    return 0
