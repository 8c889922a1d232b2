"""`slimtune ui`: the local web app (Setup, Train, Runs, Chat, Compare) on 127.0.0.1."""
from __future__ import annotations

import argparse
import sys

from ..ui import serve


def run(args: argparse.Namespace) -> int:
    serve(args.host, args.port, args.runs, args.allow_remote, log=lambda text: print(text, file=sys.stderr))
    return 0
