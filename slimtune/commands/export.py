"""`slimtune export`: a run (merged first) or a merged folder as GGUF for llama.cpp / Ollama."""
from __future__ import annotations

import argparse

from ..export.to_gguf import export


def run(args: argparse.Namespace) -> int:
    export(args.folder, args.output, args.quant, args.format, imatrix=args.imatrix)
    return 0
