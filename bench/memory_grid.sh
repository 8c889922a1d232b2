#!/usr/bin/env bash
# The estimator's check grid on one GPU: bash bench/memory_grid.sh 1b   (then 8b)
# methods lora/qlora/full/freeze/prompt_tuning x fp16/bf16, each in its own process; cells inside
# (micro-batch 1/2/8 x max_len 384/1024/4096 x checkpointing off/on). JSON lines to $OUT (or /tmp).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
SHAPE=${1:-1b}
PY=${PYTHON:-python3}
RES=${OUT:-/tmp}/memory_grid_$SHAPE.jsonl
: > "$RES"
MODEL_DIR=/tmp/llama-$SHAPE-random
if [ ! -f "$MODEL_DIR/config.json" ] && [ "${ONLY:-qlora}" = qlora ]; then   # qlora quantizes while loading, so it needs a saved model
  "$PY" - "$SHAPE" "$MODEL_DIR" <<'PYM'
import sys, torch
sys.path.insert(0, "bench")
from memory_grid import SHAPES
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models
cfg = LlamaConfig(**SHAPES[sys.argv[1]])
with torch.device("cuda"):
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
m.save_pretrained(sys.argv[2])
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>")))
tok.save_pretrained(sys.argv[2])
PYM
fi
for method in lora qlora full freeze prompt_tuning; do
  for prec in ${PRECS:-bf16 fp16}; do
    [ -n "${ONLY:-}" ] && [ "$method" != "$ONLY" ] && continue   # ONLY=qlora: one method; PRECS=fp16: one precision
    echo "== $SHAPE $method $prec"
    "$PY" bench/memory_grid.py --shape "$SHAPE" --method "$method" --precision "$prec" --model-dir "$MODEL_DIR" \
      --results "$RES" 2>&1 | grep -v -i -E "warn|^\{"
  done
done
echo "rows: $(wc -l < "$RES")"
