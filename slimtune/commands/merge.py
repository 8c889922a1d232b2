"""`slimtune merge`: a run's adapter or trained parts merged into a plain transformers model."""
from __future__ import annotations

import argparse

from ..export.merge import merge


def run(args: argparse.Namespace) -> int:
    merge(args.folder, args.output, args.dtype, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    return 0
