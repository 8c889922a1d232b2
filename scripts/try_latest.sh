#!/usr/bin/env bash
# Tries the newest releases that pyproject.toml's ranges allow, in a separate venv (.venv-latest), without
# touching .venv or constraints.txt: installs them, lists every version that differs from constraints.txt, runs
# the test suite there and reports. With --write, and only if the suite passed, constraints.txt is replaced by
# the versions just tested (refreshing the pins on purpose; commit it with the suite's result).
#   bash scripts/try_latest.sh [--write] [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
write=0; [ "${1:-}" = --write ] && { write=1; shift; }
export SLIMTUNE_VENV=.venv-latest SLIMTUNE_CONSTRAINTS=""
rm -f .venv-latest/.slimtune-installed*  # always re-resolve: the point is the newest versions
bash scripts/setup.sh test || { echo "try_latest: the newest versions do not install"; exit 1; }
.venv-latest/bin/python -m pip install -q -U -e ".[test]" 2>&1 | grep -v -E "^WARNING: Location .* is ignored"
.venv-latest/bin/python -m pip freeze | grep -v -i -E "^(slimtune|-e |#)" | sed 's/+cpu$//' > .venv-latest/freeze.txt
echo "try_latest: versions that differ from constraints.txt (pinned -> newest):"
.venv-latest/bin/python - <<'PY'
import re
def read(p):
    return dict(l.split("==", 1) for l in open(p).read().splitlines() if "==" in l and not l.startswith("#"))
old, new = read("constraints.txt"), read(".venv-latest/freeze.txt")
key = lambda n: re.sub(r"[-_.]+", "-", n).lower()
old = {key(k): v for k, v in old.items()}
diff = [(k, old.get(key(k), "-"), v) for k, v in sorted(new.items()) if old.get(key(k)) != v]
print("\n".join(f"  {k}: {a} -> {b}" for k, a, b in diff) or "  none")
PY
.venv-latest/bin/ruff check slimtune tests bench examples && .venv-latest/bin/python -m pytest -q "$@"
rc=$?
echo "try_latest: test suite exit code $rc on the newest versions"
if [ $rc = 0 ] && [ $write = 1 ]; then
  { head -2 constraints.txt; cat .venv-latest/freeze.txt; } > constraints.new \
    && mv constraints.new constraints.txt && echo "try_latest: constraints.txt rewritten; commit it"
fi
exit $rc
