#!/usr/bin/env bash
# lora against qlora GPU memory on a random-init 1B Llama-shaped model (bench/methods_memory.py).
# Makes the model once into $MODEL_DIR, then runs each method in its own process. Each JSON line goes
# to bench/results/<date>-<device>.jsonl and, where $OUT is set (the GPU machine), to $OUT too.
#   bash bench/methods_memory.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
MODEL_DIR=${MODEL_DIR:-/tmp/llama-1b-random}
RES=${OUT:+$OUT/methods_memory.jsonl}
RES=${RES:-/tmp/methods_memory.jsonl}
: > "$RES"
"$PY" - <<'PYV'
import torch, importlib.metadata as m
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
for p in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
    try: print(f"  {p} {m.version(p)}")
    except m.PackageNotFoundError: print(f"  {p} missing")
PYV
if [ ! -f "$MODEL_DIR/model.safetensors" ]; then
  "$PY" bench/methods_memory.py --make "$MODEL_DIR" || exit 1
fi
status=0
for method in lora qlora; do
  echo "== $method"
  "$PY" bench/methods_memory.py --method "$method" --model "$MODEL_DIR" --results "$RES" || { echo "== $method FAILED (rc $?)"; status=1; }
done
"$PY" - "$RES" <<'PYC'
import json, sys
rows = {r["method"]: r for r in map(json.loads, open(sys.argv[1]))}
for name, r in rows.items():
    print(f"{name:5s} peak alloc {r['peak_allocated_gib']:.2f} GiB, reserved {r['peak_reserved_gib']:.2f} GiB, "
          f"weights {r['weights_after_load_gib']:.2f} GiB (after apply {r['after_apply_gib']:.2f}), "
          f"{r['seconds_per_step']:.3f} s/step, losses {r['losses']}")
if "lora" in rows and "qlora" in rows:
    a, b = rows["lora"]["peak_allocated_gib"], rows["qlora"]["peak_allocated_gib"]
    print(f"methods_memory on {rows['lora']['device']}: qlora peak {b:.2f} GiB / lora peak {a:.2f} GiB = {b / a:.2f}")
else:
    print("methods_memory: comparison incomplete, results for: " + (", ".join(rows) or "none"))
PYC
exit $status
