#!/usr/bin/env bash
# On the GPU machine (the device tool runs it from a copy of the repo, .whl carried): installs the carried
# wheels into /tmp/site with pip --target, puts them and the repo on PYTHONPATH, then runs bench/run.py.
#   bash bench/gpu.sh speed-8b                              a named session (python bench/run.py stages lists them)
#   bash bench/gpu.sh speed --sizes 1b --recipes defaults   any bench/run.py command
# Results land in $OUT (default /tmp/out).
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-/tmp/out} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null
# fail at once, not after a model build, when a dependency the image lacks was not carried
python3 -c "import slimtune, gguf, bitsandbytes, liger_kernel" 2>/dev/null || {
  echo "bench/gpu.sh: slimtune or a carried wheel does not import; run bash bench/peers/peer_wheels.sh .whl and carry .whl"
  python3 -c "import slimtune, gguf, bitsandbytes, liger_kernel"; exit 3; }
exec python3 bench/run.py "$@"
