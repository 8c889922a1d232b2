#!/usr/bin/env bash
# Several GPUs (issue 18), run through the device tool from a copy of the repo, .whl carried:
#   bash bench/gpu_fsdp.sh x2   2-GPU test (NCCL, fast engine), then 8B LoRA on 1 and 2 GPUs and the
#                               Trainer + peft recipe on 2 GPUs (DDP), all on this machine
#   bash bench/gpu_fsdp.sh x4   8B LoRA on 1 and 4 GPUs, then full fine-tuning of the 8B shape on 4 GPUs
# Results: bench/results/<date>-h100x<N>.jsonl (also copied to $OUT).
set -uo pipefail
STAGE=${1:-x2}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
R=bench/results/$(date +%F)-h100
if [ "$STAGE" = x2 ]; then
  timeout 200 python3 -m pytest -q -x -p no:cacheprovider tests/engine/test_distributed.py -k gpus -rs 2>&1 | tail -6 | tee "$OUT/gpu_tests.log"
  timeout 330 python3 bench/fsdp_speed.py --gpus 1,2 --size 8b --offload --out "$OUT/fsdp_x2.jsonl" 2>&1 | grep -v Warn | tail -30
  timeout 240 python3 bench/fsdp_speed.py --gpus 2 --size 8b --recipes hf --out "$OUT/fsdp_x2.jsonl" 2>&1 | grep -v Warn | tail -20
elif [ "$STAGE" = x4 ]; then
  timeout 300 python3 bench/fsdp_speed.py --gpus 1,4 --size 8b --offload --out "$OUT/fsdp_x4.jsonl" 2>&1 | grep -v Warn | tail -30
  timeout 250 python3 bench/fsdp_speed.py --gpus 4 --size 8b --method full --per-gpu 4 --out "$OUT/fsdp_x4.jsonl" 2>&1 | grep -v Warn | tail -20
fi
