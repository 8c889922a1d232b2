#!/usr/bin/env bash
# GPU session for issue 8 (run through the device tool from the repo root, .whl carried):
#   bash bench/gpu_speed.sh 1b   kernel GPU tests, slimtune variants + profile, then the peers, at 1B
#   bash bench/gpu_speed.sh 8b   slimtune at 1B (fused LoRA on/off) and 8B, then the peers at 8B
#   bash bench/gpu_speed.sh explore   slimtune variants at 1B and 8B
#   bash bench/gpu_speed.sh offload-1b|offload-8b   GPU offload test; slimtune with layer inputs in CPU memory,
#        16 records in one micro-batch and 8 x 2, beside unsloth (the fastest, lowest-peak peer)
#   bash bench/gpu_speed.sh final-1b|final-8b   slimtune (16 x 1 offloaded, and 8 x 2) then unsloth, Liger, HF
#   bash bench/gpu_speed.sh memory-fast   memory grid of the fast engine path (packed, chunked, fused), +- offload
#   bash bench/gpu_speed.sh rope   Liger RoPE GPU test; headline config with/without Liger RoPE and compiled layers
#   bash bench/gpu_speed.sh memory-qlora   the estimator's grid for qlora in fp16, 1B and 8B
#   bash bench/gpu_speed.sh memory-3b   out-of-sample estimator check on a 3B shape
#   bash bench/gpu_speed.sh compile   compiled layers with Liger RoPE, and without Liger's norm/MLP (8B)
#   bash bench/gpu_speed.sh norm-mlp   GPU tests (offload, Liger norm/MLP) and slimtune with/without Liger's norm/MLP
#   bash bench/gpu_speed.sh qlora   (issue 19) QLoRA GPU tests, then at 1B and 8B, 16 records a step in one offloaded
#        micro-batch: slimtune lora, slimtune-qlora with fused LoRA layers on and off, unsloth-qlora; qlora-1b and
#        qlora-8b run one size each (the 8B half alone takes most of a 10-minute call: the saved folder is 16 GB)
#   bash bench/gpu_speed.sh issue19-1b|issue19-8b   GPU tests of the new kernels, then the defaults (lora and qlora)
#        beside unsloth (16-bit and 4-bit, padded) at one size; at 1B also compiled layers and a qlora profile
#   bash bench/gpu_speed.sh long   tiled-MLP / architecture GPU tests, then bench/long_context.py --quick (8B, LoRA and
#        QLoRA, whole GPU and 24 GiB); one command holds about half the cells: TOOLS=unsloth (or METHODS=qlora,
#        CAPS=24) runs the rest in a second command
#   bash bench/gpu_speed.sh s8-1b|s8-8b   the defaults (compiled layers since session 8) and defaults:compile=off, then
#        unsloth, one size; at 1B also QLoRA both sides and the GPU tests of compiled layers, qlora and tiled MLP
#   bash bench/gpu_speed.sh s9-diag-1b|s9-diag-8b   issue 28: the former bench loop and fit with the same keys (each
#        profiled over two steps), then the defaults, lora and qlora; logs and profiles in $OUT/logs.tgz
#   bash bench/gpu_speed.sh s9-8b   issue 28 after session 9's fixes: offload GPU test, 60-step 8B defaults (stalls),
#        8B defaults-qlora beside unsloth-qlora
#   bash bench/gpu_speed.sh qwen   slimtune defaults and the explicit 16 x 1 offloaded recipe, then unsloth, at qwen7b
# Logs and results land in $OUT (speed.jsonl is appended to bench/results/<date>-h100.jsonl afterwards).
set -uo pipefail
SIZE=${1:-1b}; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
pip() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$1" "${@:2}"; }
pip /tmp/site_test .whl/pytest-*.whl .whl/iniconfig-*.whl .whl/pluggy-*.whl
pip /tmp/site .whl/*.whl
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ "$SIZE" = 1b ]; then
  PYTHONPATH=/tmp/site_test timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/kernels -rs 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=/tmp/site_test timeout 240 python3 bench/speed.py --sizes 1b --out "$OUT/speed.jsonl" \
    --recipes slimtune,slimtune:loss=plain,slimtune:packing=off,slimtune:packing=on,slimtune:profile="$OUT/prof_1b.txt"
  PYTHONPATH=/tmp/site timeout 330 python3 bench/speed.py --sizes 1b --recipes hf,liger,unsloth --out "$OUT/speed.jsonl"
elif [ "$SIZE" = offload-1b ]; then
  PYTHONPATH=/tmp/site_test timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/engine/test_offload_gpu.py -rs 2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=/tmp/site_test timeout 200 python3 bench/speed.py --sizes 1b --out "$OUT/speed.jsonl" \
    --recipes slimtune:bs=16:ga=1:offload,slimtune:offload,slimtune:bs=16:ga=1,slimtune:bs=16:ga=1:offload:profile="$OUT/prof_1b_16x1_offload.txt"
  PYTHONPATH=/tmp/site timeout 200 python3 bench/speed.py --sizes 1b --recipes unsloth --out "$OUT/speed.jsonl"
elif [ "$SIZE" = offload-8b ]; then
  PYTHONPATH=/tmp/site_test timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/engine/test_offload_gpu.py -rs 2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=/tmp/site_test timeout 240 python3 bench/speed.py --sizes 8b --out "$OUT/speed.jsonl" \
    --recipes slimtune:bs=16:ga=1:offload,slimtune:offload,slimtune
  PYTHONPATH=/tmp/site timeout 300 python3 bench/speed.py --sizes 8b --recipes unsloth --out "$OUT/speed.jsonl"
elif [ "$SIZE" = norm-mlp ]; then  # GPU tests of offload + Liger norm/MLP; does Liger's norm/MLP pay?
  PYTHONPATH=/tmp/site:/tmp/site_test timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/engine/test_offload_gpu.py tests/kernels/test_norm_mlp_gpu.py -rs 2>&1 | grep -v Warn | tail -12 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=/tmp/site timeout 330 python3 bench/speed.py --sizes 1b,8b --out "$OUT/speed.jsonl" \
    --recipes slimtune:bs=16:ga=1:offload:fused_norm_mlp=on,slimtune:bs=16:ga=1:offload
elif [ "$SIZE" = qlora ] || [ "$SIZE" = qlora-1b ] || [ "$SIZE" = qlora-8b ]; then  # QLoRA on the fast path (issue 19)
  PYTHONPATH=/tmp/site:/tmp/site_test timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_qlora.py \
    tests/methods/test_methods.py -k "qlora" -rs 2>&1 | grep -v -i warn | tail -12 | tee -a "$OUT/gpu_tests.log"
  SIZES=${SIZE#qlora-}; [ "$SIZES" = qlora ] && SIZES=1b,8b
  for S in ${SIZES//,/ }; do
    PROF=""; [ $S = 1b ] && PROF=",slimtune-qlora:bs=16:ga=1:offload:profile=$OUT/prof_qlora_1b.txt"  # CPU-paced size
    PYTHONPATH=/tmp/site timeout 420 python3 bench/speed.py --sizes $S --out "$OUT/speed.jsonl" \
      --recipes slimtune:bs=16:ga=1:offload,slimtune-qlora:bs=16:ga=1:offload,slimtune-qlora:bs=16:ga=1:offload:fused_lora=off$PROF
    PYTHONPATH=/tmp/site timeout 400 python3 bench/speed.py --sizes $S --recipes unsloth-qlora --out "$OUT/speed.jsonl"
    # the estimator now models qlora on the fast engine (kernels/select.py on_gpu): cells to check it against
    [ $S = 1b ] && PYTHONPATH=/tmp/site timeout 150 python3 bench/memory_grid.py --shape 1b --method qlora --precision bf16 \
      --engine fast --offload --model-dir /dev/shm/m1b --mb 8,16 --lens 1024 --results "$OUT/memory_grid_qlora_fast.jsonl" \
      2>&1 | grep -v -i -E "warn|^\{" | tail -4
  done
elif [ "$SIZE" = final-1b ] || [ "$SIZE" = final-8b ]; then  # the README table: every recipe, one machine
  S=${SIZE#final-}
  PYTHONPATH=/tmp/site timeout 90 python3 bench/speed.py --sizes $S --out "$OUT/speed.jsonl" \
    --recipes slimtune:bs=16:ga=1:offload,slimtune
  PYTHONPATH=/tmp/site timeout 450 python3 bench/speed.py --sizes $S --recipes ${PEERS:-unsloth,liger,hf} --out "$OUT/speed.jsonl"
elif [ "$SIZE" = memory-fast ]; then  # the estimator's grid on the fast engine path (LoRA bf16), +- offload
  for shape in 1b 8b; do for off in "" --offload; do
    PYTHONPATH=/tmp/site timeout 150 python3 bench/memory_grid.py --shape $shape --method lora --precision bf16 \
      --engine fast $off --results "$OUT/memory_grid_fast.jsonl" 2>&1 | grep -v Warn | tail -20
  done; done
elif [ "$SIZE" = rope ]; then  # does Liger's RoPE pay? and torch.compile on the headline configuration
  PYTHONPATH=/tmp/site:/tmp/site_test timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_rope_gpu.py -rs 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=/tmp/site timeout 420 python3 bench/speed.py --sizes 1b,8b --out "$OUT/speed.jsonl" \
    --recipes slimtune:bs=16:ga=1:offload,slimtune:bs=16:ga=1:offload:fused_rope=on,slimtune:bs=16:ga=1:offload:compile
elif [ "$SIZE" = memory-qlora ]; then  # the estimator's qlora fp16 cells (bitsandbytes from .whl), 1B then 8B
  PYTHONPATH=/tmp/site:/tmp/site_test timeout 100 python3 -m pytest -q -p no:cacheprovider tests/methods/test_methods.py -k qlora -rs 2>&1 | tail -3 | tee "$OUT/gpu_tests.log"
  for shape in 1b 3b; do  # what is alive at full fine-tuning's peak (the estimator over-predicts 3B by 25%)
    PYTHONPATH=/tmp/site timeout 100 python3 bench/memory_trace.py --shape $shape --out "$OUT/memory_trace.jsonl" 2>&1 | grep -v -i warn | tail -40
  done
  for shape in 1b 8b; do
    OUT=$OUT ONLY=qlora PRECS=fp16 PYTHONPATH=/tmp/site timeout 280 bash bench/memory_grid.sh $shape 2>&1 | tail -4
  done
elif [ "$SIZE" = memory-3b ]; then  # out-of-sample check of the estimator: a shape its constants never saw
  for m in "lora bf16" "full bf16" "freeze fp16" "prompt_tuning bf16"; do set -- $m
    PYTHONPATH=/tmp/site timeout 100 python3 bench/memory_grid.py --shape 3b --method $1 --precision $2 \
      --results "$OUT/memory_grid_3b.jsonl" 2>&1 | grep -v -i -E "warn|^\{" | tail -3
  done
  PYTHONPATH=/tmp/site timeout 100 python3 bench/memory_grid.py --shape 3b --method lora --precision bf16 --engine fast --offload \
    --results "$OUT/memory_grid_3b.jsonl" 2>&1 | grep -v -i -E "warn|^\{" | tail -3
elif [ "$SIZE" = memory-full ]; then  # full fine-tuning 1B: the grid's cell beside the traced one
  PYTHONPATH=/tmp/site timeout 100 python3 bench/memory_grid.py --shape 1b --method full --precision bf16 --mb 1 --lens 384 \
    --results "$OUT/memory_grid_full.jsonl" 2>&1 | grep -v -i warn | tail -3
  for shape in 1b 3b; do
    PYTHONPATH=/tmp/site timeout 100 python3 bench/memory_trace.py --shape $shape --out "$OUT/memory_trace.jsonl" 2>&1 | grep -v -i warn | tail -34
  done
elif [ "$SIZE" = final-unsloth ]; then  # slimtune's defaults (Liger RoPE auto) beside unsloth, 1B and 8B, one machine
  PYTHONPATH=/tmp/site timeout 200 python3 bench/speed.py --sizes 1b,8b --out "$OUT/speed.jsonl" \
    --recipes slimtune:bs=16:ga=1:offload,slimtune
  PYTHONPATH=/tmp/site timeout 330 python3 bench/speed.py --sizes 1b,8b --recipes unsloth --out "$OUT/speed.jsonl"
elif [ "$SIZE" = compile ]; then  # compiled layers with and without Liger (Liger's Functions vs dynamo under checkpointing)
  PYTHONPATH=/tmp/site timeout 560 python3 bench/speed.py --sizes 1b,8b --out "$OUT/speed.jsonl" \
    --recipes slimtune:bs=16:ga=1:offload:compile:fused_rope=on,slimtune:bs=16:ga=1:offload:compile:fused_norm_mlp=off,slimtune:bs=16:ga=1:offload:compile:fused_norm_mlp=off:fused_rope=on
elif [ "$SIZE" = issue19-1b ] || [ "$SIZE" = issue19-8b ]; then  # issue 19: defaults beside unsloth, one machine
  S=${SIZE#issue19-}; export UNSLOTH_MODES=padded
  PYTHONPATH=/tmp/site:/tmp/site_test timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_qlora.py \
    tests/kernels/test_tiled_mlp_gpu.py tests/engine/test_plan.py -rs 2>&1 | grep -v -i warn | tail -8 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=/tmp/site timeout 200 python3 bench/speed.py --sizes $S --out "$OUT/speed.jsonl" --recipes defaults,defaults-qlora
  PYTHONPATH=/tmp/site timeout 300 python3 bench/speed.py --sizes $S --recipes unsloth,unsloth-qlora --out "$OUT/speed.jsonl"
  [ $S = 1b ] && PYTHONPATH=/tmp/site timeout 120 python3 bench/speed.py --sizes $S --out "$OUT/speed.jsonl" \
    --recipes slimtune:bs=16:ga=1:offload:compile,slimtune-qlora:bs=16:ga=1:offload:profile="$OUT/prof_qlora_1b.txt"
elif [ "$SIZE" = s8-1b ] || [ "$SIZE" = s8-8b ]; then  # session 8: defaults (compiled layers) and compile=off beside unsloth
  S=${SIZE#s8-}; export UNSLOTH_MODES=padded SPEED_LOG_DIR=$OUT  # each worker's log streams into $OUT
  PYTHONPATH=/tmp/site timeout ${T1:-120} python3 bench/speed.py --sizes $S --out "$OUT/speed.jsonl" --recipes defaults:compile=off
  TORCH_LOGS=recompiles,graph_breaks PYTHONPATH=/tmp/site timeout ${T2:-240} python3 bench/speed.py --sizes $S \
    --out "$OUT/speed.jsonl" --recipes defaults${Q:+,defaults-qlora}
  PYTHONPATH=/tmp/site timeout ${T3:-150} python3 bench/speed.py --sizes $S --recipes unsloth${Q:+,unsloth-qlora} --out "$OUT/speed.jsonl"
  [ -n "${TESTS:-}" ] && PYTHONPATH=/tmp/site:/tmp/site_test timeout ${T4:-150} python3 -m pytest -q -p no:cacheprovider \
    tests/kernels/test_compiled_gpu.py tests/kernels/test_qlora.py tests/kernels/test_tiled_mlp_gpu.py \
    tests/engine/test_host_reads.py::test_one_gpu_sync_per_step -rs 2>&1 \
    | grep -v -i warn | tail -15 > "$OUT/gpu_tests.log"
elif [ "$SIZE" = s9-diag-1b ] || [ "$SIZE" = s9-diag-8b ]; then  # issue 28: fit beside the former bench loop
  S=${SIZE#s9-diag-}; export SPEED_LOG_DIR=/tmp/logs; mkdir -p /tmp/logs
  PYTHONPATH=/tmp/site timeout ${T1:-500} python3 bench/speed.py --sizes $S --out "$OUT/speed.jsonl" \
    --recipes ${RECIPES:-loop:bs=16:ga=1:offload:profile=/tmp/logs/prof_loop.txt,slimtune:bs=16:ga=1:offload:profile=/tmp/logs/prof_fit.txt,defaults,defaults-qlora}
  tar czf "$OUT/logs.tgz" -C /tmp/logs .
elif [ "$SIZE" = s9-8b ]; then  # issue 28 after the fixes: offload GPU test, a 60-step 8B defaults run, QLoRA beside unsloth
  export UNSLOTH_MODES=padded SPEED_LOG_DIR=/tmp/logs; mkdir -p /tmp/logs
  PYTHONPATH=/tmp/site:/tmp/site_test timeout 90 python3 -m pytest -q -p no:cacheprovider tests/engine/test_offload_gpu.py \
    -rs 2>&1 | grep -v -i warn | tail -4 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=/tmp/site timeout 150 python3 bench/speed.py --sizes 8b --steps ${STEPS:-60} --out "$OUT/speed.jsonl" --recipes defaults
  PYTHONPATH=/tmp/site timeout 330 python3 bench/speed.py --sizes 8b --out "$OUT/speed.jsonl" --recipes defaults-qlora,unsloth-qlora
  tar czf "$OUT/logs.tgz" -C /tmp/logs .
elif [ "$SIZE" = issue19-1b-quick ]; then  # the 1B defaults beside unsloth, with the qlora GPU test's message
  export UNSLOTH_MODES=padded
  PYTHONPATH=/tmp/site:/tmp/site_test timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_qlora.py \
    -k "gpu_under_bf16" 2>&1 | grep -E "^E |passed|failed" | head -12 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=/tmp/site timeout 120 python3 bench/speed.py --sizes 1b --out "$OUT/speed.jsonl" --recipes defaults,defaults-qlora
  PYTHONPATH=/tmp/site timeout 200 python3 bench/speed.py --sizes 1b --recipes unsloth,unsloth-qlora --out "$OUT/speed.jsonl"
elif [ "$SIZE" = long ]; then  # issue 19: the longest record that trains, slimtune beside unsloth
  PYTHONPATH=/tmp/site:/tmp/site_test timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/kernels/test_tiled_mlp_gpu.py \
    tests/kernels/test_tiled_mlp.py tests/kernels/test_architectures.py -rs 2>&1 | grep -v Warn | tail -12 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=/tmp/site timeout 420 python3 bench/long_context.py --quick --budget-s 400 --tools ${TOOLS:-slimtune,unsloth} \
    --methods ${METHODS:-lora,qlora} --caps ${CAPS:-0,24} --out "$OUT/long_context.jsonl"
elif [ "$SIZE" = qwen ]; then  # issue 19: the Qwen-shaped size (Qwen2.5-7B shapes, a Qwen2 model), defaults first
  PYTHONPATH=/tmp/site timeout 240 python3 bench/speed.py --sizes qwen7b --out "$OUT/speed.jsonl" \
    --recipes defaults,slimtune:bs=16:ga=1:offload
  PYTHONPATH=/tmp/site timeout 330 python3 bench/speed.py --sizes qwen7b --recipes unsloth --out "$OUT/speed.jsonl"
elif [ "$SIZE" = explore ]; then  # what pays: peft's casts off (default) vs kept, compiled decoder layers
  PYTHONPATH=/tmp/site_test timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels -rs 2>&1 | tail -25 | tee "$OUT/gpu_tests.log"
  PYTHONPATH=/tmp/site_test timeout 420 python3 bench/speed.py --sizes 1b,8b --out "$OUT/speed.jsonl" \
    --recipes slimtune,slimtune:compile:profile="$OUT/prof_compiled.txt"
else
  PYTHONPATH=/tmp/site_test timeout 120 python3 bench/speed.py --sizes 1b --out "$OUT/speed.jsonl" \
    --recipes slimtune,slimtune:fused_lora=off,slimtune:profile="$OUT/prof_1b.txt"
  PYTHONPATH=/tmp/site_test timeout 150 python3 bench/speed.py --sizes 8b --out "$OUT/speed.jsonl" \
    --recipes slimtune,slimtune:profile="$OUT/prof_8b.txt"
  PYTHONPATH=/tmp/site timeout 380 python3 bench/speed.py --sizes 8b --recipes hf,liger,unsloth --out "$OUT/speed.jsonl"
fi
