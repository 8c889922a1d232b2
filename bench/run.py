"""One entry point for the benches, each command named by what it measures.

    python bench/run.py speed --sizes 1b,8b --recipes defaults,unsloth   # bench/speed.py
    python bench/run.py long-context --quick                             # bench/long_context.py
    python bench/run.py fsdp --gpus 1,4 --size 8b                        # bench/fsdp_speed.py
    python bench/run.py dpo --size 8b                                    # bench/preference_speed.py
    python bench/run.py table                                            # docs/benchmarks.md
    python bench/run.py speed-8b                                         # a named GPU session (bench/stages.py)
    python bench/run.py stages                                           # lists the sessions

Every argument after the command goes to its script unchanged (`python bench/run.py speed --help`); the
scripts also run directly. On the GPU machine, `bash bench/gpu.sh <command> ...` first installs the carried
wheels (.whl) and then runs this.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import stages  # noqa: E402
import table  # noqa: E402

SCRIPTS = {  # command: (script, what it measures)
    "speed": ("speed.py", "tokens/s and peak memory on one GPU, slimtune's recipes beside its peers"),
    "long-context": ("long_context.py", "the longest single record that trains on one GPU"),
    "fsdp": ("fsdp_speed.py", "tokens/s on several GPUs (FSDP2) beside one GPU and the Trainer under DDP"),
    "moe-speed": ("moe_speed.py", "QLoRA of a mixture of experts (Qwen3-30B-A3B shape) on one GPU beside unsloth"),
    "memory-grid": ("memory_grid.py", "measured peak GPU memory over a grid of runs (the estimator's check data)"),
    "methods-memory": ("methods_memory.py", "GPU memory of lora against qlora at 1B"),
    "memory-trace": ("memory_trace.py", "what is alive at a grid cell's peak GPU memory"),
    "estimator-check": ("check_estimator.py", "the estimator's prediction beside memory-grid results (CPU)"),
    "fsdp-estimator-check": ("check_fsdp_estimator.py", "the estimator's per-GPU prediction beside fsdp results"),
    "gguf-export": ("gguf_export.py", "GGUF export time, file size and held-out loss per quant type (CPU)"),
    "loss-curve": ("loss_curve.py", "slimtune's loss curve beside the Trainer + peft on the same data"),
    "grpo-speed": ("grpo_speed.py", "GRPO step time (generation, training) and tokens/s beside TRL's GRPOTrainer"),
    "dpo": ("preference_speed.py", "DPO tokens/s and peak memory on one GPU, slimtune beside TRL's DPOTrainer + peft"),
    "attention-speed": ("attention_speed.py", "causal attention of one record, forward + backward: the varlen kernel "
                        "beside SDPA's backends"),
}


def usage() -> str:
    lines = [__doc__.split("\n")[0], "", "commands (arguments go to the script):"]
    lines += [f"  {name:22s} bench/{script}: {what}" for name, (script, what) in SCRIPTS.items()]
    lines += [f"  {'table':22s} docs/benchmarks.md from bench/results/*.jsonl (--check: only compare)",
              f"  {'stages':22s} the named GPU sessions below", "", "GPU sessions (bash bench/gpu.sh NAME):"]
    lines += [f"  {name:22s} {what}" for name, (what, _) in stages.STAGES.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help", "stages"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in SCRIPTS:
        return subprocess.call([sys.executable, str(HERE / SCRIPTS[name][0]), *rest])
    if name == "table":
        return table.main(rest)
    if name in stages.STAGES:
        if rest and (len(rest) != 2 or rest[0] != "--out"):
            print(f"bench/run.py {name}: a session takes only --out DIR (default $OUT or /tmp/out)", file=sys.stderr)
            return 2
        return stages.run_stage(name, rest[1] if rest else "")
    print(f"bench/run.py: unknown command {name!r}; `python bench/run.py stages` lists them", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
