"""`slimtune export`: a run (merged first) or a merged folder as GGUF for llama.cpp / Ollama."""
from __future__ import annotations

from ..export.gguf import export


def add(ex) -> None:
    ex.add_argument("folder", help="a run folder written by `slimtune train`, or a merged model folder")
    ex.add_argument("--format", default="gguf", choices=["gguf", "ollama"],
                    help="ollama: also a Modelfile beside the GGUF (template and stop tokens)")
    ex.add_argument("--output", required=True, help="the .gguf file to write")
    ex.add_argument("--quant", default="f16", choices=["f16", "bf16", "q8_0", "q4_0", "q4_k_m"],
                    help="weight type (1-D tensors stay F32); q4_k_m keeps output and some attn_v/ffn_down at 6 bits")


def run(args) -> int:
    export(args.folder, args.output, args.quant, args.format)
    return 0
