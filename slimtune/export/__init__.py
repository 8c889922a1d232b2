"""Out of slimtune: a run merged into its base (merge.py), written as GGUF (gguf.py, quants.py) with an Ollama
Modelfile (ollama.py); the run folder it reads is slimtune/runs/'s. ExportError is here, beside them all:
gguf.py raises it and ollama.py too, and neither imports the other for it."""
from __future__ import annotations

from ..errors import SlimtuneError


class ExportError(SlimtuneError, ValueError):
    """The model or tokenizer cannot be written as GGUF (unsupported architecture, tokenizer, rope), or its
    chat template as an Ollama Modelfile."""
