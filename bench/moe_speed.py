"""QLoRA of a mixture-of-experts base on one GPU, and two dense families, slimtune beside unsloth.

Each recipe runs in its own process (bench/speed.py's pattern) and prints one JSON line; rows are appended to
--out (bench/results/<date>-<device>.jsonl by default).

Recipes:
  slimtune-qlora  the Qwen3-30B-A3B shape (seed_recipe.FAMILIES["qwen3moe"]: hidden 2048, 48 layers, 128
                  experts of width 768, 8 a token, 32/4 heads of 128, vocab 151936), random init built straight
                  into 4-bit: the model is made on the meta device, its Linear layers become bitsandbytes
                  Linear4bit with slimtune's qlora settings (NF4, double quantization, bf16 compute; lm_head
                  left out, as transformers leaves it), and each tensor is materialized on the GPU one at a
                  time, every fused expert stack packed into NF4 as it is made (methods/quant_experts.py), so
                  the 61 GB bf16 model never exists. LoRA r=16 / alpha 16 / dropout 0 on q, k, v, o and both
                  expert weights (gate_up_proj, down_proj: peft's target_parameters), records of --len (4096)
                  tokens, one a step, gradient checkpointing, bf16, through slimtune.prepare + slimtune.fit;
                  tokens/s from fit's metrics.jsonl. Peak allocated and reserved memory beside slimtune's
                  estimate for the same config (engine/memory.estimate: its predicted peak reserved, without
                  the CUDA context) and their ratio.
  unsloth-qlora   unsloth on the same shape and records (unsloth_recipe.py --load-in-4bit, padded mode: one
                  record a step, so nothing is padded). unsloth quantizes the fused experts itself under
                  transformers 5 (unsloth_zoo temporary_patches/moe_utils_bnb4bit.py); it loads a folder, so
                  --make saves one first, in --folder: a sparse file whose expert weights are holes of zeros
                  (unsloth_recipe.save_sparse: 2.5 GB instead of 61; the rest random, so the random routers
                  spread tokens over the experts as in slimtune's model; matmuls take as long on zeros).
  families        bench/speed.py's defaults and unsloth recipes on the gemma3 (Gemma-3-4B text) and phi3
                  (Phi-3-mini, fused qkv_proj / gate_up_proj) shapes: bf16 LoRA, its 16-record workload.

  python bench/moe_speed.py --recipes slimtune-qlora,unsloth-qlora     # the MoE on one GPU
  python bench/moe_speed.py --recipes families                          # gemma3 and phi3
  python bench/moe_speed.py --smoke                                     # tiny shapes on the CPU, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
ROOT = HERE.parent
sys.path[:0] = [str(PEERS), str(HERE), str(ROOT)]
import speed  # noqa: E402
from seed_recipe import SIZES, model_config, synthetic_examples  # noqa: E402

GIB = 2 ** 30
MOE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def _bnb_config(dtype: object) -> object:
    """The 4-bit settings slimtune's qlora loads with (methods/quant.quantization_config, which asks for CUDA)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def build_4bit(shape: str, dev: str, dtype: object, max_len: int) -> object:
    """A random-init model of `shape` made in 4-bit one tensor at a time: Linear layers (not lm_head) as
    bitsandbytes Linear4bit, fused expert stacks as NF4 stacks, the rest (embeddings, norms, routers) in
    `dtype`. Norm weights are ones, the others normal(0, initializer_range)."""
    import bitsandbytes as bnb
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    from slimtune.methods import quant_experts

    torch.manual_seed(0)
    mcfg = model_config(shape, max_position_embeddings=max(4096, max_len))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype)
    replace_with_bnb_linear(model, modules_to_not_convert=["lm_head"], quantization_config=_bnb_config(dtype))
    model.is_loaded_in_4bit = True  # as transformers marks a model it quantized (peft's 4-bit LoRA layers read it)
    std = mcfg.initializer_range
    for name, module in list(model.named_modules()):
        for leaf, p in list(module.named_parameters(recurse=False)):
            if not p.is_meta:
                continue
            norm = "norm" in name.rsplit(".", 1)[-1]
            data = torch.ones(p.shape, device=dev, dtype=dtype) if norm else \
                torch.randn(p.shape, device=dev, dtype=dtype) * std
            if isinstance(module, bnb.nn.Linear4bit):
                module.weight = bnb.nn.Params4bit(data, requires_grad=False, compress_statistics=True,
                                                  quant_type="nf4", module=module).to(dev)
            elif p.ndim == 3:  # a fused expert stack: packed now, its 16-bit copy freed with `data`
                module._parameters[leaf] = torch.nn.Parameter(quant_experts.quantize(data), requires_grad=False)
            else:
                module._parameters[leaf] = torch.nn.Parameter(data, requires_grad=False)
            del data
    rotary = model.model.rotary_emb  # its inverse frequencies are computed, not loaded: make it again
    with torch.device(dev):
        model.model.rotary_emb = type(rotary)(config=mcfg)
    return model


def _config(a: argparse.Namespace, out: Path, steps: int, dev: str) -> object:
    import yaml

    import slimtune

    base = out / "base.yaml"
    base.write_text(yaml.safe_dump({
        "method": {"name": "qlora", "r": 16, "alpha": 16, "dropout": 0.0, "target_modules": MOE_TARGETS},
        "train": {"output_dir": str(out / "run")}, "data": {"max_len": a.len}}))
    keys = {"micro_batch_size": 1, "grad_accum": 1, "gradient_checkpointing": "true", "lr": 1e-4, "seed": 0,
            "max_steps": steps, "save_every": 0, "log_every": 1, "eval_at_start": "false",
            "precision": "bf16" if dev == "cuda" else "fp32"}
    return slimtune.load_config(base, [f"train.{k}={v}" for k, v in keys.items()] + a.key)


def qlora_worker(a: argparse.Namespace) -> dict:
    """slimtune-qlora: the 4-bit model built in place, then slimtune.prepare + slimtune.fit."""
    import torch

    import slimtune
    from slimtune.data.encode import Encoded
    from slimtune.engine import memory
    from slimtune.runs.metrics_log import read_metrics

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    steps, warmup = a.steps, a.warmup
    out = Path(tempfile.mkdtemp(prefix="moe-speed-"))
    cfg = _config(a, out, steps + warmup, dev)
    mcfg = model_config(a.shape, max_position_embeddings=max(4096, a.len))
    raw = synthetic_examples(steps + warmup + 2, a.len, length=a.len, vocab=mcfg.vocab_size)
    trained = sum(1 for t in raw[0]["labels"][1:] if t != -100)
    est = memory.estimate(cfg, [(a.len, trained)], mcfg=mcfg)  # a GPU run's kernels, as `slimtune estimate`
    t0 = time.perf_counter()
    model = build_4bit(a.shape, dev, dtype, a.len)
    build_s = time.perf_counter() - t0
    built_gib = torch.cuda.memory_allocated() / GIB if dev == "cuda" else 0.0
    stacks = [p for p in model.parameters() if type(p).__name__ == "Nf4Stack"]
    n_params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
    say(f"built {a.shape} in 4-bit in {build_s:.1f}s: {n_params / 1e9:.2f}B parameters, {len(stacks)} NF4 expert "
        f"stacks, {built_gib:.2f} GiB allocated; estimate {est.peak / GIB:.2f} GiB")
    records = [Encoded(r["input_ids"], r["labels"], where=f"synthetic {i}") for i, r in enumerate(raw)]
    row = dict(recipe="slimtune qlora (experts in NF4, LoRA on attention + experts)" + "".join(f", {k}" for k in a.key),
               size=a.shape,
               params=n_params, max_len=a.len, record_len=a.len, bs=1, ga=1, r=16, lora_targets=MOE_TARGETS,
               build_s=round(build_s, 1), built_gib=round(built_gib, 2), estimate_gib=round(est.peak / GIB, 2),
               device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", versions=speed._versions())
    try:
        prepared = slimtune.prepare(model, cfg, dev, log=say)
        trainable, total = slimtune.count_parameters(prepared.model)
        say(f"trainable {trainable:,} of {total:,}")
        took = slimtune.fit(prepared.model, records, cfg, device=dev, log=say)
        row["fused_expert_layers"] = took.get("fused_expert_layers")
    except torch.OutOfMemoryError as err:
        return dict(row, real_tok_s=0, peak_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
                    error=f"out of memory: {str(err)[:200]}", log=lines[-20:])
    rows = [r for r in read_metrics(out / "run" / "metrics.jsonl") if "loss" in r]
    seen = [r["input_tokens_per_s"] * r["elapsed_s"] for r in rows]
    real, dt = seen[-1] - seen[warmup - 1], rows[-1]["elapsed_s"] - rows[warmup - 1]["elapsed_s"]
    times = [r["step_s"] for r in rows[warmup:]]
    peak = torch.cuda.max_memory_allocated() / GIB if dev == "cuda" else 0.0
    reserved = torch.cuda.max_memory_reserved() / GIB if dev == "cuda" else 0.0
    return dict(row, trainable=trainable, steps=len(times), real_tok_s=round(real / dt), pad_fraction=0.0,
                peak_gib=round(peak, 2), peak_reserved_gib=round(reserved, 2),
                reserved_over_estimate=round(reserved / (est.peak / GIB), 3) if dev == "cuda" else None,
                mfu_real=round(real / dt * 4 * n_params / speed.PEAK_FLOPS, 3),
                step_s_median=round(statistics.median(times), 3), step_s=[round(t, 3) for t in times],
                losses=[round(r["loss"], 4) for r in rows[warmup:]], estimate=est.table().splitlines(),
                chose=[x for x in lines if "experts" in x or "fast path" in x or "predicted" in x][:8])


def commands(name: str, a: argparse.Namespace) -> list[list[str]]:
    """The processes of recipe `name`: this script's worker, unsloth_recipe.py, or speed.py's recipes."""
    py, steps = sys.executable, ["--steps", str(a.steps), "--warmup", str(a.warmup)]
    if name == "slimtune-qlora":
        keys = [x for k in a.key for x in ("--key", k)]
        return [[py, str(Path(__file__)), "--worker", "--shape", a.shape, "--len", str(a.len), *steps, *keys]]
    if name == "unsloth-qlora":
        path = str(Path(a.folder) / f"m{a.shape}z")
        make = [] if Path(path, "config.json").exists() else \
            [[py, str(PEERS / "unsloth_recipe.py"), "--size", a.shape, "--make", "--path", path,
              "--max_pos", str(max(4096, a.len)), "--zero-experts"]]
        return make + [[py, str(PEERS / "unsloth_recipe.py"), "--size", a.shape, "--path", path, "--modes", "padded",
                        "--load-in-4bit", "--bs", "1", "--ga", "1", "--max_len", str(a.len),
                        "--record_len", str(a.len), *steps]]
    if name == "families":
        recipes = ["defaults"] if a.smoke else ["defaults", "unsloth"]
        families = ["gemma3-tiny", "phi3-tiny"] if a.smoke else ["gemma3", "phi3"]
        return [cmd for size in families for r in recipes for cmd in speed.recipe_commands(r, size, a)]
    raise SystemExit(f"unknown recipe {name}: slimtune-qlora, unsloth-qlora, families")


def table(rows: list[dict]) -> str:
    out = ["| recipe | shape | real tok/s | peak GiB (allocated / reserved) | estimate GiB | reserved / estimate |",
           "|---|---|---|---|---|---|"]
    for r in rows:
        est = r.get("estimate_gib")
        out.append(f"| {r['recipe']} | {r['size']} | {r['real_tok_s']:,} | {r['peak_gib']:.2f} / "
                   f"{r.get('peak_reserved_gib', 0.0):.2f} | {est if est is not None else '-'} | "
                   f"{r.get('reserved_over_estimate') or '-'} |")
    return "\n".join(out)


def ratios(rows: list[dict]) -> list[str]:
    """slimtune's tokens/s and peak over unsloth's, shape by shape."""
    lines = []
    for size in dict.fromkeys(r["size"] for r in rows):
        ours = [r for r in rows if r["size"] == size and r["recipe"].startswith("slimtune") and r["real_tok_s"]]
        theirs = [r for r in rows if r["size"] == size and r["recipe"].startswith("unsloth") and r["real_tok_s"]]
        lines += [f"{size}: {o['recipe']} / {t['recipe']}: speed {o['real_tok_s'] / t['real_tok_s']:.2f}x, "
                  f"peak {o['peak_gib'] / max(t['peak_gib'], 1e-9):.2f}x" for o in ours for t in theirs]
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=None, help="default: slimtune-qlora,unsloth-qlora (--smoke: "
                    "slimtune-qlora,families)")
    ap.add_argument("--shape", default="qwen3moe", help=f"the MoE shape: {', '.join(k for k in SIZES if 'moe' in k)}")
    ap.add_argument("--len", type=int, default=4096, help="tokens a record (one record a step)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--folder", default="/dev/shm", help="unsloth-qlora: where --make saves the bf16 model")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: slimtune-qlora and families")
    ap.add_argument("--worker", action="store_true", help="run slimtune-qlora in this process")
    ap.add_argument("--key", action="append", default=[], help="slimtune-qlora: a config override, e.g. "
                    "train.fused_lora=on (repeatable; named in the row's recipe)")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.smoke:
        a.shape, a.len, a.steps, a.warmup = "qwen3moe-tiny", 64, 2, 1
        a.recipes = a.recipes or "slimtune-qlora,families"
        a.max_len = 64  # speed.py's workers, through speed.recipe_commands
    else:
        a.max_len, a.recipes = 1024, a.recipes or "slimtune-qlora,unsloth-qlora"
    if a.worker:
        print(json.dumps(qlora_worker(a)), flush=True)
        return 0
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    rows: list[dict] = []
    for name in a.recipes.split(","):
        for cmd in commands(name, a):
            if a.smoke and Path(cmd[1]).name == "speed.py":
                cmd = [*cmd, "--max_len", str(a.max_len)]
            found = speed._run(cmd, log, os.environ.get("SPEED_LOG_DIR", ""))
            if not a.smoke:
                speed._append(found, a.out)
            rows += found
    if not rows:
        return 1
    print(table(rows))
    print("\n".join(ratios(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
