#!/usr/bin/env bash
# The test suite on the CPU (tiny random models, plus end-to-end tests on the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
VENV=${SLIMTUNE_VENV:-.venv}
"$VENV/bin/ruff" check slimtune tests bench examples  # lint (pyproject.toml [tool.ruff]): a finding fails the run
exec "$VENV/bin/python" -m pytest -q "$@"
