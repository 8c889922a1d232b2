#!/usr/bin/env bash
# DPO end to end on the CPU: installs what it needs, writes the pairs (LLaMA-Factory's dpo_en_demo.json from its
# PyPI sdist), scores the embedded model on 40 held-out pairs, trains examples/dpo_embedded.yaml into runs/dpo,
# scores the run, and prints preference accuracy, mean margin and the chosen answers' SFT loss before and after.
# Extra arguments are config overrides, e.g. `bash scripts/dpo_demo.sh train.seed=1`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/dpo_embedded.py --out dpo_data --run runs/dpo "$@"
exec .venv/bin/slimtune eval runs/dpo --data dpo_data/held.jsonl
