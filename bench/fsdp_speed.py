"""Several GPUs: slimtune's engine under torchrun + FSDP2 beside its own single-GPU figure and the
transformers Trainer + peft recipe under torchrun (DDP), on one machine in one sitting.

The workload is bench/speed.py's (a random-init Llama-shaped model, synthetic alpaca-like records, LoRA
r=16 on the seven projections, bf16, checkpointing), with `--per-gpu` records per optimizer step on each
GPU (16 by default: one micro-batch of 16 x GPUs records, split by tokens, as `slimtune train` splits it).
Each rank builds the model on its GPU, applies the method and FSDP2 shards it (engine/distributed.py).

  python bench/fsdp_speed.py --gpus 1,2 --size 8b                    # slimtune on 1 then 2 GPUs
  python bench/fsdp_speed.py --gpus 4 --size 8b --method full         # full fine-tuning, 4 GPUs
  python bench/fsdp_speed.py --gpus 2 --size 8b --recipes hf          # the peer under torchrun (DDP)
  python bench/fsdp_speed.py --gpus 4 --size 8b --prefetch 2 --reshard 1   # FSDP2 knobs (train.fsdp_*)

Every rank-0 result carries real tokens/s over all GPUs, the largest per-GPU peak (allocated and reserved)
and the estimator's per-GPU prediction (engine/memory.estimate with gpus=N). Results are appended to
bench/results/<date>-<device>x<N>.jsonl.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE / "peers"))
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _config(a, world: int, shape_dir: str):
    import torch

    from slimtune import config as config_mod

    return config_mod.from_dict({
        "model": {"path": shape_dir},
        "method": {"name": a.method, "r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ALL_LINEAR},
        "train": {"micro_batch_size": a.per_gpu * world, "grad_accum": 1, "lr": 1e-5 if a.method == "full" else 1e-4,
                  "precision": "bf16" if torch.cuda.is_available() else "fp32", "gradient_checkpointing": True,
                  "packing": "rows",
                  "offload_activations": a.offload, "max_steps": a.steps + a.warmup, "seed": 0},
        "data": {"max_len": a.max_len}})


def worker(a) -> None:
    """One rank: model on its GPU -> checkpointing -> method -> fp32 trainable -> FSDP2 -> steps."""
    # as `slimtune train` runs (cli.main): what the estimator models, and far less fragmentation
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    import slimtune
    from seed_recipe import SIZES, synthetic_examples
    from slimtune.data.encode import Encoded
    from slimtune.data.stream import collate_micro, counts, micro_batches, share
    from slimtune.engine import distributed, loop, memory
    from slimtune.engine.optim import build_optimizer, build_scheduler
    from slimtune.kernels import select

    cuda = torch.cuda.is_available()
    device = distributed.init("cuda" if cuda else "cpu")  # the CPU (gloo): a smoke test of this script
    world = distributed.size()
    mcfg = LlamaConfig(**SIZES[a.size], max_position_embeddings=4096)
    shape_dir = tempfile.mkdtemp(prefix=f"shape-{a.size}-")
    mcfg.save_pretrained(shape_dir)  # the estimator builds the same shapes on the meta device from it
    cfg = _config(a, world, shape_dir)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(mcfg, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    prepared = slimtune.prepare(model, cfg, device, log=lambda *_: None)  # checkpointing, method, fp32 trainable
    model, plan = prepared.model, prepared.dtypes
    if world > 1:
        model = distributed.shard(model, device, reshard=a.reshard, prefetch=a.prefetch)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()  # the whole model each rank built before sharding
    took = select.enable(model, cfg.train, device)
    n = cfg.train.micro_batch_size * (a.steps + a.warmup + 1)
    records = [Encoded(r["input_ids"], r["labels"], where=f"synthetic {i}")
               for i, r in enumerate(synthetic_examples(n, a.max_len))]
    stream = micro_batches(records, cfg.train, a.max_len, took["packing"])
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, a.steps + a.warmup, cfg.train)
    context = loop.forward_context(plan, device, cfg.train.offload_activations, model)
    model.train()
    worst: list = []

    def one_step() -> tuple[int, dict]:
        micro = next(stream)
        if sum(len(r.input_ids) for r in micro) > sum(len(r.input_ids) for r in worst):
            worst[:] = micro
        batch = collate_micro(share(micro, distributed.rank(), world), stream.packed, 0, device)
        n_tok, seen = counts(micro, world)  # as the loop counts them: on the host, over every rank's share
        row = loop.step(model, [batch], optimizer, scheduler, 1.0, context, None, guard=True,
                        chunked=took["chunked_loss"], n_tokens=n_tok)
        return seen, row

    for _ in range(a.warmup):
        one_step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    real, times, losses = 0, [], []
    for i in range(a.steps):
        if a.profile and i == a.steps - 1:
            _profile(one_step, a.profile, distributed.rank())
            continue
        t0 = time.perf_counter()
        seen, row = one_step()
        sync()
        times.append(time.perf_counter() - t0)
        real += seen
        losses.append(round(row["loss"], 4))
    peaks = distributed.all_max([torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                                 torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0], device)
    est = memory.estimate(cfg, [(len(r.input_ids), sum(x != -100 for x in r.labels)) for r in worst], world)
    if distributed.is_main():
        dt = sum(times)
        print("RESULT " + json.dumps(dict(
            recipe=f"slimtune FSDP2 ({a.method}, {a.per_gpu} records/step/GPU" + (", offload" if a.offload else "")
            + _knobs(a) + ")",
            size=a.size, params=n_params, gpus=world, method=a.method, per_gpu=a.per_gpu,
            fsdp_reshard=a.reshard, fsdp_prefetch=a.prefetch,
            max_len=a.max_len, steps=len(times), real_tok_s=round(real / dt), tok_s_per_gpu=round(real / dt / world),
            peak_gib=round(peaks[0], 2), peak_reserved_gib=round(peaks[1], 2),
            predicted_gib=round((est.peak + est.cuda_context) / 2**30, 2),
            predicted_reserved_gib=round(est.peak / 2**30, 2),
            step_s=[round(t, 3) for t in times], losses=losses, profiled_steps=int(bool(a.profile)),
            kernels=took.as_dict(),
            device=torch.cuda.get_device_name() if cuda else "cpu")), flush=True)
    distributed.close()


def _knobs(a) -> str:
    """The FSDP2 settings away from the defaults, for the recipe's name."""
    knobs = {0: "", 1: ", layers kept whole forward to backward"}.get(a.reshard, f", resharded to {a.reshard} GPUs")
    return knobs + (f", prefetch {a.prefetch} layers" if a.prefetch else "")


def _profile(one_step, path: str, rank: int) -> None:
    """One step under torch.profiler on every rank; rank 0's top ops by GPU time (NCCL kernels included)
    go to `path`, and the step's trace to `path`.json for a timeline (chrome://tracing, perfetto)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one_step()
        torch.cuda.synchronize()
    if rank == 0:
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
        Path(path).write_text(table)
        prof.export_chrome_trace(path + ".json")
        print(table[:5000], file=sys.stderr, flush=True)


def _launch(cmd: list[str], log) -> list[dict]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT {")]
    found += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{\"recipe\"")]
    log(f"{' '.join(cmd[3:])}: rc {proc.returncode}, {time.perf_counter() - t0:.0f}s, {len(found)} result(s)")
    if proc.returncode or not found:
        log(proc.stdout[-2000:] + proc.stderr[-4000:])
    return found


def _torchrun(gpus: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--size", default="8b")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--recipes", default="slimtune")
    ap.add_argument("--per-gpu", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--offload", action="store_true")
    ap.add_argument("--keep-gathered", action="store_true", help="the same as --reshard 1")
    ap.add_argument("--reshard", type=int, default=0, help="train.fsdp_reshard: GPUs a layer is spread over "
                    "between forward and backward (0 = all, 1 = kept whole, N = groups of N)")
    ap.add_argument("--prefetch", type=int, default=0, help="train.fsdp_prefetch: layers all-gathered ahead "
                    "explicitly in forward and backward (0 = FSDP2's own)")
    ap.add_argument("--profile", default="", help="worker: profile the last step, rank 0's table to this file")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    a.reshard = 1 if a.keep_gathered else a.reshard
    if a.worker:
        worker(a)
        return 0
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for gpus in [int(g) for g in a.gpus.split(",")]:
        for recipe in a.recipes.split(","):
            if recipe == "slimtune":
                cmd = _torchrun(gpus) + [__file__, "--worker", "--size", a.size, "--method", a.method,
                                         "--per-gpu", str(a.per_gpu), "--max-len", str(a.max_len),
                                         "--steps", str(a.steps), "--warmup", str(a.warmup)] \
                    + (["--offload"] if a.offload else []) \
                    + ["--reshard", str(a.reshard), "--prefetch", str(a.prefetch)] \
                    + (["--profile", f"{a.profile}-{gpus}gpu.txt"] if a.profile else [])
            else:  # the Trainer recipe, 8 x 2 records per GPU as bench/speed.py runs it, DDP under torchrun
                cmd = _torchrun(gpus) + [str(HERE / "peers" / "seed_recipe.py"), "--size", a.size, "--configs",
                                         "modern", "--steps", str(a.steps), "--warmup", str(a.warmup)]
            found = _launch(cmd, log)
            if recipe != "slimtune" and found:  # every rank prints its own batches' tokens/s: add them up
                found = [dict(found[0], gpus=gpus, real_tok_s=sum(r["real_tok_s"] for r in found),
                              peak_gib=max(r["peak_gib"] for r in found),
                              recipe=found[0]["recipe"] + " under torchrun (DDP)")]
            rows += found
    if not rows:
        return 1
    name = rows[0]["device"]
    slug = "h100" if "H100" in name else "h200" if "H200" in name else name.lower().replace(" ", "-")
    most = max(r["gpus"] for r in rows)
    out = Path(a.out or HERE / "results" / f"{datetime.date.today()}-{slug}x{most}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        for r in rows:
            fh.write(json.dumps(dict(r, bench="fsdp_speed", date=str(datetime.date.today()))) + "\n")
    for r in rows:
        print(f"{r['recipe']}, {r['size']}, {r['gpus']} GPU(s): {r['real_tok_s']:,} tok/s, peak {r['peak_gib']} GiB"
              + (f" (predicted {r['predicted_reserved_gib']} GiB reserved, measured {r['peak_reserved_gib']})"
                 if "predicted_reserved_gib" in r else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
