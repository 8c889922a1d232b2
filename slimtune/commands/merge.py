"""`slimtune merge`: a run's adapter or trained parts merged into a plain transformers model."""
from __future__ import annotations

from ..export.merge import merge
from .options import TRUST_HELP


def add(mg) -> None:
    mg.add_argument("folder", help="a run folder written by `slimtune train`")
    mg.add_argument("--output", required=True, help="folder for the merged model")
    mg.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    mg.add_argument("--overwrite", action="store_true", help="replace the merged model already in --output")
    mg.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP + " (and copies it into the output "
                    "only then)")


def run(args) -> int:
    merge(args.folder, args.output, args.dtype, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    return 0
