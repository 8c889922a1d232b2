"""Named GPU sessions for bench/run.py: each is a few commands that fit one 10-minute call on the device machine.

    bash bench/gpu.sh speed-8b        # installs the carried wheels (.whl), then runs the stage
    python bench/run.py stages        # lists them

A stage's name says what it measures. Each command runs under its own time limit in its own process group
(the limit kills the recipe workers too); a limit that expires ends that command, not the stage. Results
go to $OUT (default /tmp/out): speed.jsonl, long_context.jsonl, ..., gpu_tests.log for GPU test output,
and logs.tgz with each speed worker's log and the profiles. Append the JSON lines to
bench/results/<date>-<device>.jsonl afterwards, then `python bench/run.py table`.
"""
from __future__ import annotations

import collections
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = Path("/tmp/logs")  # speed workers' logs and profiles (SPEED_LOG_DIR), packed into $OUT/logs.tgz
NOISE = re.compile(r"warn", re.IGNORECASE)
OFFLOADED = "bs=16:ga=1:offload"  # 16 records in one micro-batch, layer inputs in CPU memory


@dataclass
class Step:
    """One command: `cmd` the arguments after the interpreter (a script or `-m pytest`; a .sh script runs under
    bash), `limit` its time limit in seconds.
    tail: keep only the last lines (GPU tests; also written to $OUT/gpu_tests.log); env: extra variables;
    budget: skip the step when the stage has already run this many seconds."""
    cmd: list[str]
    limit: int
    tail: int = 0
    env: dict = field(default_factory=dict)
    budget: int = 0


def speed(sizes: str, recipes: str, limit: int, *extra: str, **env: str) -> Step:
    return Step(["bench/speed.py", "--sizes", sizes, "--recipes", recipes, "--out", "{OUT}/speed.jsonl", *extra],
                limit, env=env)


def tests(limit: int, *paths: str, tail: int = 15) -> Step:
    return Step(["-m", "pytest", "-q", "-p", "no:cacheprovider", *paths, "-rs"], limit, tail=tail)


def grid(shape: str, method: str, precision: str, limit: int, *extra: str, out: str = "memory_grid") -> Step:
    return Step(["bench/memory_grid.py", "--shape", shape, "--method", method, "--precision", precision, *extra,
                 "--results", f"{{OUT}}/{out}.jsonl"], limit)


def fsdp(gpus: str, limit: int, *extra: str, out: str = "fsdp", budget: int = 0) -> Step:
    return Step(["bench/fsdp_speed.py", "--gpus", gpus, "--size", "8b", *extra, "--out", f"{{OUT}}/{out}.jsonl"], limit,
                budget=budget)


def dpo(size: str, recipes: str, limit: int) -> Step:
    return Step(["bench/preference_speed.py", "--size", size, "--recipes", recipes, "--out", "{OUT}/dpo.jsonl"], limit)


def longest(tool: str, method: str, cap: str, limit: int, *extra: str) -> Step:
    """bench/long_context.py for one cell, its --budget-s 20 s inside the step's limit."""
    return Step(["bench/long_context.py", "--tools", tool, "--methods", method, "--caps", cap, "--budget-s",
                 str(limit - 20), *extra, "--out", "{OUT}/long_context.jsonl"], limit)


def long_context(method: str, cap: int, max_step_s: int, slimtune: tuple[int, int], unsloth: tuple[int, int]
                 ) -> tuple[str, list[Step]]:
    """One cell of bench/long_context.py per tool: slimtune with --predict, then unsloth; (time limit, --resolution)
    of each."""
    guard = ("--max-step-s", str(max_step_s))
    return (f"the longest single record that trains in {cap} GiB (set_per_process_memory_fraction; on a GPU of "
            f"{cap} GiB or less, the whole GPU), 8B {method} r=32, slimtune beside unsloth: slimtune tries 16k "
            "(tokens/s) and the lengths near its memory estimator's prediction in one process, unsloth doubles from "
            f"16k and bisects; a length projected to take over {max_step_s} s a step is not tried (the cell's "
            "longest is then a lower bound)", [
                longest("slimtune", method, str(cap), slimtune[0], "--predict", "--resolution", str(slimtune[1]),
                        *guard),
                longest("unsloth", method, str(cap), unsloth[0], "--resolution", str(unsloth[1]), *guard)])


def far(tool: str, method: str, tokens: int = 262144) -> tuple[str, list[Step]]:
    """One whole-GPU length in a call of its own: past the lengths a doubling from 16k reaches within one call."""
    return (f"{tool} 8B {method} r=32 on the whole GPU at one record of {tokens:,} tokens, one step (minutes at this "
            "length: a whole-GPU cell's lower bound raised past what a search from 16k reaches in one call)", [
                longest(tool, method, "80", 560, "--from-tokens", str(tokens), "--max-doublings", "1",
                        "--max-step-s", "480")])


PADDED = {"UNSLOTH_MODES": "padded"}  # unsloth's faster mode only
PROFILED = ",".join(f"{recipe}:profile={LOGS}/prof_{name}.txt" for recipe, name in  # each its last two steps
                    ((f"slimtune:{OFFLOADED}", "fit"), ("defaults", "defaults"), ("defaults-qlora", "defaults_qlora")))
TUNE = ["--offload", "--steps", "5", "--warmup", "2"]
STAGES: dict[str, tuple[str, list[Step]]] = {
    "speed-1b": ("the defaults (lora, lora with compile=off, qlora) beside unsloth (16-bit and 4-bit, padded), 1B", [
        speed("1b", "defaults,defaults:compile=off,defaults-qlora", 240),
        speed("1b", "unsloth,unsloth-qlora", 300, **PADDED)]),
    "speed-8b": ("the defaults and defaults:compile=off beside unsloth (padded), 8B", [
        speed("8b", "defaults,defaults:compile=off", 280),
        speed("8b", "unsloth", 220, **PADDED)]),
    "lora-8b": ("200 timed steps of the 8B defaults (tokens/s, median and slowest step, stalls), then unsloth "
                "(padded), 8B", [
        speed("8b", "defaults", 330, "--steps", "200"),
        speed("8b", "unsloth", 240, **PADDED)]),
    "qlora-8b": ("QLoRA GPU tests, then the defaults with method qlora beside unsloth-qlora (padded), 8B", [
        tests(120, "tests/kernels/test_qlora.py", tail=8),
        speed("8b", "defaults-qlora,unsloth-qlora", 400, **PADDED)]),
    "stalls-8b": ("the offload GPU test and the allocator counters' GPU test, then 200 timed steps of the 8B "
                  "defaults: median, slowest step, stalls and what they held (gc_s, alloc_retries, device_allocs)", [
        tests(150, "tests/engine/test_offload_gpu.py", "tests/engine/test_step_times.py::"
              "test_pauses_counts_the_cuda_allocators_new_device_allocations_and_freezes_on_cuda", tail=40),
        speed("8b", "defaults", 360, "--steps", "200")]),
    "profile-1b": ("fit with the 16 x 1 offloaded keys, then the defaults, lora and qlora, 1B, each profiled over its "
                   "last two steps (torch.profiler tables in logs.tgz)", [speed("1b", PROFILED, 420)]),
    "profile-8b": ("the same as profile-1b at 8B", [speed("8b", PROFILED, 480)]),
    "ahead-8b": ("the offload GPU test, then the 8B defaults beside the same with offload's copy ahead off "
                 "(diagnostic), twice each, alternating", [
        tests(150, "tests/engine/test_offload_gpu.py", tail=6),
        speed("8b", "defaults,defaults:ahead=off,defaults,defaults:ahead=off", 300)]),
    "casts-8b": ("the 8B defaults beside the same with each adapter cast in every pass (defaults:cast_once=off, "
                 "diagnostic), twice each, alternating", [
        speed("8b", "defaults,defaults:cast_once=off,defaults,defaults:cast_once=off", 330)]),
    "compile-8b": ("the 8B defaults (Liger's norm/MLP, eager layers) beside the same with fused_norm_mlp=off "
                   "(compiled layers instead)", [speed("8b", "defaults,defaults:fused_norm_mlp=off", 520)]),
    # 96 records a micro-batch (about 30,000 tokens, the 96 longest 53,770) pass select.TILE_TOKENS: the plan leaves
    # the MLP whole where the micro-batch fits so (engine/split.py); tiled_mlp=on slices it, one more MLP forward
    "tiles-8b": ("the 8B defaults with 96 records a step (the MLP whole, as the plan keeps it where it fits) beside "
                 "the same with the MLP sliced (tiled_mlp=on): what the slices cost a step", [
        speed("8b", "defaults:batch_size=96,defaults:batch_size=96:tiled_mlp=on", 420)]),
    "attention-speed": ("causal attention of one record (8B heads), forward + backward, 1k-64k tokens: the varlen "
                        "FlashAttention-2 kernel packed rows take beside SDPA's cuDNN, flash and efficient backends "
                        "(bench/attention_speed.py)", [
        Step(["bench/attention_speed.py", "--out", "{OUT}/attention.jsonl"], 300)]),
    "one-record-8b": ("8B LoRA r=32, one record of 16k, 32k and 64k tokens on the whole GPU (tokens/s at 16k, each "
                      "length's first step), its attention through the varlen kernel, SDPA (torch's backend) and SDPA "
                      "with cuDNN first (long_context.py --quick --one-record, diagnostic rows)", [
        Step(["bench/long_context.py", "--quick", "--tools", "slimtune", "--methods", "lora", "--caps", "0",
              "--max-step-s", "30", "--budget-s", "130", "--one-record", kind, "--out", "{OUT}/long_context.jsonl"],
             150) for kind in ("varlen", "sdpa", "cudnn")]),
    "compiled-4bit": ("whether compiled decoder layers train right around the fused 4-bit node "
                      "(bench/check_compiled_4bit.py: lora and qlora, bf16 and fp32 bases, against eager), then the "
                      "1B qlora defaults (compiled layers), the same with compile=off (eager layers), and unsloth", [
        Step(["bench/check_compiled_4bit.py", "--out", "{OUT}/compiled_4bit.jsonl"], 180),
        speed("1b", "defaults-qlora,defaults-qlora:compile=off,unsloth-qlora", 380, **PADDED)]),
    "peers-1b": ("slimtune (16 x 1 offloaded, and 8 x 2) beside unsloth, Liger and the Trainer + peft, 1B", [
        speed("1b", f"slimtune:{OFFLOADED},slimtune", 100),
        speed("1b", "unsloth,liger,hf", 400)]),
    "peers-8b": ("the same as peers-1b at 8B", [
        speed("8b", f"slimtune:{OFFLOADED},slimtune", 120),
        speed("8b", "unsloth,liger,hf", 400)]),
    "qwen-7b": ("the defaults and the 16 x 1 offloaded recipe beside unsloth on the Qwen2.5-7B shape", [
        speed("qwen7b", f"defaults,slimtune:{OFFLOADED}", 240),
        speed("qwen7b", "unsloth", 300)]),
    "long-context": ("tiled-MLP and architecture GPU tests, then the longest record that trains, slimtune beside "
                     "unsloth (bench/long_context.py --quick: 8B, lora and qlora, whole GPU and 24 GiB); "
                     "TOOLS, METHODS, CAPS (environment) choose the cells", [
        tests(110, "tests/kernels/test_tiled_mlp_gpu.py", "tests/kernels/test_tiled_mlp.py",
              "tests/kernels/test_architectures.py", tail=12),
        Step(["bench/long_context.py", "--quick", "--budget-s", "400", "--tools", "{TOOLS}", "--methods", "{METHODS}",
              "--caps", "{CAPS}", "--out", "{OUT}/long_context.jsonl"], 420)]),
    "long-context-24-qlora": long_context("qlora", 24, 240, (250, 8192), (310, 16384)),
    "long-context-24-lora": long_context("lora", 24, 240, (200, 4096), (300, 4096)),
    # the estimator's whole-GPU lengths (~500k tokens on 80 GiB) take many minutes a step: these cells end at the
    # longest length projected to train within 120 s, a lower bound
    "long-context-80-qlora": long_context("qlora", 80, 120, (250, 8192), (310, 16384)),
    "long-context-80-lora": long_context("lora", 80, 120, (250, 8192), (310, 16384)),
    **{f"long-context-80-{method}-262k{'' if tool == 'slimtune' else '-unsloth'}": far(tool, method)
       for method in ("lora", "qlora") for tool in ("slimtune", "unsloth")},
    "offload-test": ("the GPU test of activation offload (tests/engine/test_offload_gpu.py)", [
        tests(150, "tests/engine/test_offload_gpu.py", tail=12)]),
    "offload-grads": ("which pass (fused LoRA, again, peft's after lora.disable) gives LoRA gradients of zeros, "
                      "lora and qlora with offload off/on/all, compile auto/off, eval/train mode, tiny Llama in bf16 "
                      "(bench/check_offload_grads.py)", [
        Step(["bench/check_offload_grads.py", "--budget-s", "150", "--out", "{OUT}/offload_grads.jsonl"], 200)]),
    "kernel-tests": ("every GPU test of the kernels, the split plan and the one host sync per step", [
        tests(480, "tests/kernels", "tests/engine/test_split.py",
              "tests/engine/test_host_reads.py::test_one_gpu_sync_per_step", tail=30)]),
    "memory-grid-fast": ("the estimator's grid on the fast engine path (lora bf16), 1B and 8B, with and without "
                         "offload", [
        grid(s, "lora", "bf16", 125, "--engine", "fast", *off, out="memory_grid_fast")
        for s in ("1b", "8b") for off in ((), ("--offload",))]),
    "memory-grid-qlora": ("the estimator's grid for qlora in fp16 (bench/memory_grid.sh), 1B and 8B", [
        Step(["bench/memory_grid.sh", s], 250, env={"ONLY": "qlora", "PRECS": "fp16"}) for s in ("1b", "8b")]),
    "memory-grid-3b": ("the estimator checked on a shape its constants never saw (3B): four methods and the fast "
                       "path", [
        *(grid("3b", m, p, 100, out="memory_grid_3b")
          for m, p in (("lora", "bf16"), ("full", "bf16"), ("freeze", "fp16"), ("prompt_tuning", "bf16"))),
        grid("3b", "lora", "bf16", 100, "--engine", "fast", "--offload", out="memory_grid_3b")]),
    "memory-trace": ("what is alive at full fine-tuning's peak, 1B and 3B, and the 1B grid cell beside it", [
        grid("1b", "full", "bf16", 100, "--mb", "1", "--lens", "384", out="memory_grid_full"),
        *(Step(["bench/memory_trace.py", "--shape", s, "--out", "{OUT}/memory_trace.jsonl"], 100)
          for s in ("1b", "3b"))]),
    "fsdp-2gpu": ("the 2-GPU test (NCCL, fast engine), then 8B lora on 1 and 2 GPUs", [
        tests(200, "tests/engine/test_distributed.py", "-k", "gpus", tail=6),
        fsdp("1,2", 330, "--offload")]),
    "fsdp-2gpu-peer": ("the Trainer + peft recipe on 2 GPUs (DDP), 8B lora", [
        fsdp("2", 240, "--recipes", "hf")]),
    "fsdp-4gpu": ("8B lora on 1 and 4 GPUs, then full fine-tuning of the 8B shape on 4 GPUs", [
        fsdp("1,4", 290, "--offload"),
        fsdp("4", 230, "--method", "full", "--per-gpu", "4")]),
    # prefetching further ahead hides all-gathers behind matmuls, layers kept whole drop the backward all-gathers,
    # more records per GPU give each all-gather more matmul to hide behind (32 a GPU is another workload: its
    # tok/s beside the 1-GPU figure at 16 shows what the batch buys)
    "fsdp-4gpu-knobs": ("8B lora on 1 GPU, then 4-GPU variants of the FSDP2 knobs (train.fsdp_prefetch, "
                        "train.fsdp_reshard, records per GPU), each with its speed-up over 1 GPU", [
        fsdp("1", 110, *TUNE, out="fsdp_knobs"),
        *(fsdp("4", 90, *TUNE, *v, out="fsdp_knobs", budget=400) for v in
          ((), ("--prefetch", "1"), ("--prefetch", "2"), ("--reshard", "1", "--prefetch", "1"),
           ("--per-gpu", "32", "--prefetch", "1"))),
        Step(["bench/stages.py", "--speedup", "{OUT}/fsdp_knobs.jsonl"], 30)]),
    "grpo-1b": ("GRPO at 1B, 8 prompts x 8 completions of 256 tokens a step: slimtune, then TRL's GRPOTrainer + peft "
                "(step time split into generation and training, tokens/s, slimtune / trl)", [
        Step(["bench/grpo_speed.py", "--recipes", "slimtune", "--limit", "240", "--out", "{OUT}/grpo.jsonl"], 250),
        Step(["bench/grpo_speed.py", "--recipes", "trl", "--limit", "280", "--out", "{OUT}/grpo.jsonl"], 290),
        Step(["bench/grpo_speed.py", "--compare", "{OUT}/grpo.jsonl"], 20)]),
    "dpo-8b": ("DPO, 8 pairs a step: slimtune (the model saved first) beside TRL's DPOTrainer + peft, 8B "
               "(bench/preference_speed.py: tokens/s, peak memory, the estimator's prediction)", [
        dpo("8b", "slimtune", 300), dpo("8b", "trl", 260)]),
    "dpo-1b": ("the same as dpo-8b at 1B", [dpo("1b", "slimtune", 150), dpo("1b", "trl", 150)]),
    "moe-30b": ("NF4 expert GPU tests, then QLoRA of the Qwen3-30B-A3B shape (experts adapted, 4096-token records) "
                "on one GPU: slimtune (peak beside its estimate) and unsloth (bench/moe_speed.py)", [
        tests(50, "tests/methods/test_quant_experts_gpu.py", tail=6),
        Step(["bench/moe_speed.py", "--recipes", "slimtune-qlora", "--out", "{OUT}/speed.jsonl"], 200),
        Step(["bench/moe_speed.py", "--recipes", "unsloth-qlora", "--out", "{OUT}/speed.jsonl"], 320)]),
    "moe-30b-experts": ("the per-expert LoRA path's GPU tests, then the Qwen3-30B-A3B QLoRA of moe-30b (the "
                        "experts' LoRA per expert, the GPU default) beside unsloth", [
        tests(160, "tests/kernels/test_expert_lora_gpu.py", tail=12),
        Step(["bench/moe_speed.py", "--recipes", "slimtune-qlora,unsloth-qlora", "--out", "{OUT}/speed.jsonl"], 340)]),
    "families": ("bf16 LoRA on the Gemma-3-4B and Phi-3-mini shapes: the defaults beside unsloth (padded)", [
        speed("gemma3,phi3", "defaults", 230),
        speed("gemma3,phi3", "unsloth", 330, **PADDED)]),
}
DEFAULTS = {"TOOLS": "slimtune,unsloth", "METHODS": "lora,qlora", "CAPS": "0,24"}


def _fill(arg: str, out: str) -> str:
    values = {"OUT": out, **{k: os.environ.get(k, v) for k, v in DEFAULTS.items()}}
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), m.group(0)), arg)


def run_step(step: Step, out: str, log) -> int:
    """Runs one step under its limit, output line by line (lines about warnings dropped); returns its exit code."""
    program = ["bash"] if step.cmd[0].endswith(".sh") else [sys.executable]
    cmd = [*program, *(_fill(a, out) for a in step.cmd)]
    log(f"$ {' '.join(cmd[1:])}  (limit {step.limit}s)")
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", SPEED_LOG_DIR=str(LOGS), OUT=out,
               **step.env)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timer = threading.Timer(step.limit, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    kept = collections.deque(maxlen=step.tail or None)
    for line in proc.stdout:
        if NOISE.search(line):
            continue
        if step.tail:
            kept.append(line)
        else:
            print(line, end="", flush=True)
    rc = proc.wait()
    timer.cancel()
    if step.tail:
        text = "".join(kept)
        print(text, end="", flush=True)
        with open(Path(out, "gpu_tests.log"), "a") as fh:
            fh.write(text)
    if rc:
        log(f"rc {rc}" + (" (its time limit)" if rc == -signal.SIGKILL else ""))
    return rc


def run_stage(name: str, out: str = "") -> int:
    """Runs every step of a stage (a failed step does not stop the next); 1 when any step failed."""
    out = out or os.environ.get("OUT", "/tmp/out")
    Path(out).mkdir(parents=True, exist_ok=True)
    LOGS.mkdir(parents=True, exist_ok=True)
    log = lambda text: print(f"[{name}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    start, failed = time.monotonic(), 0
    for step in STAGES[name][1]:
        if step.budget and time.monotonic() - start > step.budget:
            log(f"out of time before {' '.join(step.cmd)}")
            continue
        failed |= bool(run_step(step, out, log))
    if any(LOGS.iterdir()):
        with tarfile.open(Path(out, "logs.tgz"), "w:gz") as tar:
            tar.add(LOGS, arcname=".")
    return int(failed)


def speedup(path: str) -> None:
    """Each fsdp_speed.py row of `path` with its tokens/s over the 1-GPU row's."""
    rows = [json.loads(x) for x in open(path) if x.strip()]
    one = next((r for r in rows if r["gpus"] == 1), None)
    for r in rows:
        x = f"{r['real_tok_s'] / one['real_tok_s']:.2f}x of 1 GPU" if one else "no 1-GPU row"
        print(f"{r['gpus']} GPU(s) {r['recipe']}: {r['real_tok_s']:,} tok/s, {x}, peak {r['peak_reserved_gib']} GiB")


if __name__ == "__main__" and sys.argv[1:2] == ["--speedup"]:
    speedup(sys.argv[2])
