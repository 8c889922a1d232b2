"""`slimtune ui`: the local web app (Setup, Train, Runs, Chat, Compare) on 127.0.0.1."""
from __future__ import annotations

import sys

from ..ui import serve


def add(u) -> None:
    u.add_argument("--port", type=int, default=7860)
    u.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only); "
                   "another one also needs --allow-remote")
    u.add_argument("--allow-remote", action="store_true", help="with --host: serve to other machines; anyone who "
                   "can reach the port can start runs and read files under the working directory (no login)")
    u.add_argument("--runs", default="runs", help="folder for the app's runs (relative to the working directory); "
                   "the app reads and writes only under it and the working directory")


def run(args) -> int:
    serve(args.host, args.port, args.runs, args.allow_remote, log=lambda text: print(text, file=sys.stderr))
    return 0
