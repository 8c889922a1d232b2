#!/usr/bin/env bash
# The demo, end to end on the CPU: installs what it needs, then fine-tunes the embedded model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/slimtune demo "$@"
