"""Measured peak GPU memory over a grid of slimtune runs, to check the estimator (slimtune estimate).

Random-init Llama-shaped models (1b: hidden 2048 / 16 layers; 8b: hidden 4096 / 32 layers; vocab 128256),
methods x precisions x micro-batch x max_len x checkpointing. Each (model, method, precision) runs in its own
process (bench/memory_grid.sh); each cell builds a fresh optimizer and runs 2 optimizer steps on synthetic
rows of exactly max_len tokens with the first half of each row masked (-100), so the peak includes AdamW's
state creation. A cell that runs out of memory is recorded as oom. Output: one JSON line per cell.

    python bench/memory_grid.py --shape 1b --method lora --precision bf16 --results out.jsonl
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as slimtune's CLI sets it
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import slimtune  # noqa: E402
from slimtune import config  # noqa: E402
from slimtune.engine import precision  # noqa: E402
from slimtune.engine.loop import forward_context, step  # noqa: E402
from slimtune.engine.optim import build_optimizer, build_scheduler  # noqa: E402
from slimtune.methods.quant import quantization_config  # noqa: E402
from slimtune.engine.recompute import enable_checkpointing  # noqa: E402

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # out-of-sample: the estimator's constants were fitted on 1b/8b cells only (Llama-3.2-3B's shape)
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
GIB = 2 ** 30


def method_cfg(name: str) -> config.MethodConfig:
    return config.MethodConfig(name=name, r=16, alpha=32, dropout=0.0, target_modules=["all-linear"],
                               trainable_layers=2, num_virtual_tokens=20)


def build(shape: str, name: str, plan, model_dir: str | None):
    """The model on the GPU in the plan's base dtype (qlora: loaded 4-bit from a saved folder)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    mcfg = method_cfg(name)
    if name == "qlora":
        from slimtune import models

        half = "fp16" if plan.weights == torch.float16 else "bf16"  # as train: the base's unquantized parts too
        model, _ = models.load(model_dir, half, device="cuda", quantization=quantization_config(mcfg, plan.name))
    else:
        cfg = LlamaConfig(**SHAPES[shape], dtype=plan.weights)
        with torch.device("cuda"):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=plan.weights)
    return model, mcfg


def batch(mb: int, length: int, vocab: int, device: str = "cuda"):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (mb, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device)}


def packed_batch(mb: int, length: int, vocab: int):
    """The fast engine's micro-batch: mb records of `length` tokens in one packed row."""
    from slimtune.data.encode import Encoded
    from slimtune.data.stream import collate_micro

    b = batch(mb, length, vocab, "cpu")  # the same tokens, read on the host
    records = [Encoded(b["input_ids"][i].tolist(), b["labels"][i].tolist()) for i in range(mb)]
    return collate_micro(records, True, 0, "cuda")


def cell(model, plan, mb: int, length: int, vocab: int, fast: bool = False, offload: bool = False) -> dict:
    tc = config.TrainConfig(lr=1e-5, scheduler="constant", precision=plan.name)
    b = packed_batch(mb, length, vocab) if fast else batch(mb, length, vocab)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, 2, tc)
    ctx = forward_context(plan, "cuda", offload, model)
    scaler = precision.scaler(plan, "cuda")
    t0 = time.perf_counter()
    rows = [step(model, [b], opt, sched, 1.0, ctx, scaler, chunked=fast) for _ in range(2)]
    torch.cuda.synchronize()
    out = {"seconds": round(time.perf_counter() - t0, 3), "losses": [round(r["loss"], 4) for r in rows],
           "static_gib": base / GIB, "after_step_gib": torch.cuda.memory_allocated() / GIB,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB}
    del opt, sched, b
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--precision", required=True, choices=["bf16", "fp16"])
    ap.add_argument("--model-dir", help="saved random model (qlora loads it 4-bit)")
    ap.add_argument("--mb", default="1,2,8")
    ap.add_argument("--lens", default="384,1024,4096")
    ap.add_argument("--results", required=True)
    ap.add_argument("--engine", choices=["plain", "fast"], default="plain",
                    help="fast: what train does on CUDA (packed rows, chunked loss, fused LoRA, Liger norm/MLP auto)")
    ap.add_argument("--offload", action="store_true", help="train.offload_activations (with --engine fast)")
    args = ap.parse_args()
    plan = precision.choose_dtypes(args.precision, "cuda")
    total = torch.cuda.mem_get_info()[1]
    head = {"bench": "memory_grid", "shape": args.shape, "method": args.method, "precision": args.precision,
            "device": torch.cuda.get_device_name(), "device_total_gib": total / GIB, "date": time.strftime("%Y-%m-%d"),
            "torch": torch.__version__, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
            "engine": args.engine, "offload": args.offload}
    try:
        model, mcfg = build(args.shape, args.method, plan, args.model_dir)
        weights = torch.cuda.memory_allocated()
    except torch.OutOfMemoryError:
        for ckpt in (False, True):
            for mb in map(int, args.mb.split(",")):
                for length in map(int, args.lens.split(",")):
                    row = dict(head, ckpt=ckpt, mb=mb, len=length, oom=True, oom_at="load")
                    print(json.dumps(row), flush=True)
                    with open(args.results, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
        return
    vocab = model.config.vocab_size
    fast = args.engine == "fast"
    # checkpointing is switched on below, between the grid's halves; fast: the kernels as train switches them
    # on (packed rows, fused LoRA, Liger norm/MLP where auto takes it)
    tc = config.TrainConfig(precision=args.precision, packing="rows", fused_lora="on")
    prep = slimtune.prepare(model, config.Config(method=mcfg, train=tc), "cuda", log=lambda m: None, kernels=fast)
    model = prep.model
    if fast:
        head.update(fused_lora_layers=prep.kernels["fused_lora_layers"], fused_norm_mlp=prep.kernels["fused_norm_mlp"])
    head.update(weights_gib=weights / GIB, params=slimtune.count_parameters(model))
    for ckpt in ((True,) if args.offload else (False, True)):
        if ckpt:
            enable_checkpointing(model, mcfg, log=lambda m: None)
        model.train()
        for mb in map(int, args.mb.split(",")):
            for length in map(int, args.lens.split(",")):
                row = dict(head, ckpt=ckpt, mb=mb, len=length, trained_tokens=mb * (length - length // 2))
                try:
                    row.update(cell(model, plan, mb, length, vocab, fast, args.offload), oom=False)
                except torch.OutOfMemoryError:
                    row.update(oom=True, peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB)
                for p in model.parameters():
                    p.grad = None
                gc.collect()
                torch.cuda.empty_cache()
                print(f"  ckpt={ckpt:d} mb={mb} len={length:5d} " + ("OOM" if row["oom"] else
                      f"peak {row['peak_allocated_gib']:.2f} / reserved {row['peak_reserved_gib']:.2f} GiB "
                      f"{row['seconds']:.1f}s"), flush=True)
                with open(args.results, "a") as fh:
                    fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
