#!/usr/bin/env bash
# The test suite on the CPU (tiny random models, plus end-to-end tests on the embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
VENV=${SLIMTUNE_VENV:-.venv}
"$VENV/bin/ruff" check slimtune tests bench examples  # lint (pyproject.toml [tool.ruff]): a finding fails the run
# Two pytest-xdist workers (SLIMTUNE_TEST_WORKERS to change; 0 runs in this process): torch runs on one thread in
# the tests (tests/conftest.py), so two workers use both cores of a 2-core machine; each takes whole modules,
# the slowest first (tests/conftest.py); the 10 slowest tests are listed at the end.
start=$(date +%s); rc=0
"$VENV/bin/python" -m pytest -q -n "${SLIMTUNE_TEST_WORKERS:-2}" --durations=10 "$@" || rc=$?
took=$(( $(date +%s) - start ))
echo "test: pytest took $((took / 60)) min $((took % 60)) s"
exit "$rc"
