#!/usr/bin/env bash
# The web app's browser tests alone (headless Debian chromium, `apt-get install chromium`), writing each page's
# screenshot to docs/ui/*.png for the README. Run after changing a page; commit the PNGs.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x /usr/bin/chromium ] || { echo "ui_screenshots: no /usr/bin/chromium (apt-get install chromium)" >&2; exit 1; }
SLIMTUNE_SCREENSHOTS="$PWD/docs/ui" exec "$PY" -m pytest -q -p no:cacheprovider tests/ui/test_browser.py "$@"
