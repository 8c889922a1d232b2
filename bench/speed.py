"""Speed and memory on one GPU, slimtune beside its peers, each recipe in its own process.

The workload is bench/peers/seed_recipe.py's "modern" one, the same for every recipe: a random-init
Llama-shaped model (1b: Llama-3.2-1B shapes, 8b: Llama-3.1-8B shapes; qwen7b: a Qwen2 model of Qwen2.5-7B
shapes, q/k/v with a bias, seed_recipe.model_config; speed and memory do not depend on
the weights' values), synthetic alpaca-like records (seed_recipe.synthetic_examples: prompt 15..120
tokens, response lognormal around 180 tokens, sigma 0.7, clipped to 8..2000, plus EOS, prompt masked
with -100, cut at max_len 1024), LoRA r=16 / alpha 16 / dropout 0 on the seven projections, 8 records
per micro-batch, accumulation 2 (16 records per optimizer step), gradient checkpointing, bf16, lr 1e-4,
2 warm-up steps then 20 timed steps (--steps); slimtune's rows give the mean (tokens/s), median and slowest
step from fit's metrics.jsonl (step_s) and the steps over 2x the median (stalls).

UNSLOTH_MODES=padded (environment) runs only unsloth's padded mode, its faster one.

Recipes:
  hf       transformers Trainer + peft, padded batches (seed_recipe.py)
  liger    the same with Liger-Kernel patched into Llama (seed_recipe.py --liger)
  unsloth  unsloth, padded and padding-free (unsloth_recipe.py; two results)
  slimtune slimtune through prepare + fit, as the defaults recipe, with each speed key set (typed train.*
           overrides): each micro-batch's 8 records packed into one row (train.packing=rows:
           the same records per step as the peers), varlen attention, chunked head + loss, fused LoRA
           layers, Liger norm/MLP where auto takes it, fused AdamW. Keys after a colon change it:
           slimtune:bs=16:ga=1:offload is the README's headline (16 records in one micro-batch, layer
           inputs offloaded); also packing=, loss=, fused_lora=, fused_norm_mlp=, fused_rope=, chunk_bytes=,
           compile, profile=PATH (train.profile_step over the last two steps)
  slimtune-qlora  the slimtune recipe with method qlora: the base loaded through bitsandbytes 4-bit NF4
           (double quant, bf16 compute) from a saved folder, as `slimtune train` loads it; the same keys
  unsloth-qlora   unsloth with load_in_4bit=True (unsloth_recipe.py --load-in-4bit; two results)
  defaults slimtune as a user who names the method (with the peers' LoRA settings: r 16, alpha 16, the seven
           projections; dropout is the default, 0, as the peers') and the batch gets it (defaults_worker):
           slimtune.prepare + slimtune.fit, every train.* speed key left at its default; defaults:compile=off
           sets one key, typed as the config types it (defaults:offload_activations=true);
           defaults:profile=PATH profiles its last two steps;
           defaults:ahead=off (DIAGNOSTIC) brings offloaded layer inputs back only when backward reads them;
           defaults:cast_once=off (DIAGNOSTIC) casts each LoRA adapter in every forward, recompute and backward
           defaults:gc_probe (DIAGNOSTIC) records what each full garbage collection scanned and freed
           defaults:profile=PATH:stacks (DIAGNOSTIC) the profile also groups copies by the stack that made them
  defaults-qlora  the same with method qlora (the 4-bit base loaded from the saved folder); the same keys
           (defaults-qlora:compile=off: eager decoder layers over the 4-bit base)

Each prints real (non-pad) tokens/s, peak allocated memory and MFU: 4·N·tokens/s over 989 TFLOP/s (the
peers' convention: frozen base, forward + input-gradient backward) and 6·N (recomputation counted).

  python bench/speed.py --sizes 1b,8b                    # every recipe, one after another
  python bench/speed.py --sizes 1b --recipes slimtune    # only ours
  python bench/speed.py --worker --size 1b --packing rows --loss chunked   # one slimtune process

Peers need wheels the GPU image lacks: `bash bench/peers/peer_wheels.sh .whl`, carry .whl; bench/gpu.sh installs
them with pip --target (`bash bench/gpu.sh speed --sizes 1b --recipes unsloth`). `python bench/run.py speed ...`
runs this script. Results are appended to bench/results/<date>-<device>.jsonl.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
ROOT = HERE.parent
PEAK_FLOPS = 989e12  # H100 SXM dense bf16


def _workload(size: str, n: int, max_len: int):
    sys.path.insert(0, str(PEERS))
    from seed_recipe import SIZES, synthetic_examples
    return SIZES[size], synthetic_examples(n, max_len, vocab=SIZES[size]["vocab_size"])


def _targets(size: str) -> list[str]:
    """LoRA's targets on this size (seed_recipe.lora_targets: Phi-3's are fused)."""
    sys.path.insert(0, str(PEERS))
    from seed_recipe import lora_targets
    return lora_targets(size)


def _slimtune_train_keys(a) -> list[str]:
    """The slimtune recipe's keys (bs=16:ga=1:offload...) as typed train.* overrides: what a user who sets
    each speed key writes in the config."""
    keys = {"micro_batch_size": a.bs, "grad_accum": a.ga, "gradient_checkpointing": "true", "precision": "bf16",
            "packing": a.packing, "loss": a.loss, "fused_lora": a.fused_lora, "fused_norm_mlp": a.fused_norm_mlp,
            "fused_rope": a.fused_rope, "offload_activations": str(bool(a.offload)).lower(),
            "compile": "on" if a.compile else a.compile_mode}
    return [f"{k}={v}" for k, v in keys.items()]


def worker(a) -> dict:
    """The slimtune recipe: the same path as the defaults recipe (prepare + fit, metrics.jsonl's step times),
    with every speed key set from the recipe's keys instead of left to auto."""
    return defaults_worker(a, explicit=_slimtune_train_keys(a))


def _model(size: str, dev: str, meta: bool = False):
    """seed_recipe's random-init model of this size (Llama, or Qwen2 for qwen7b) on `dev` (on the meta device
    when `meta`: only its parameter count is read)."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(PEERS))
    from seed_recipe import model_config
    torch.manual_seed(0)
    mcfg = model_config(size, max_position_embeddings=4096)
    with torch.device("meta" if meta else dev):
        return AutoModelForCausalLM.from_config(mcfg, attn_implementation="sdpa",
                                                dtype=torch.bfloat16 if dev == "cuda" else torch.float32)


def _defaults_train(steps: int, extra: tuple[str, ...] = ()) -> list[str]:
    """The train.* overrides of the defaults recipe: the batch of 16 records and the workload's lr, seed and step
    count; nothing about micro-batch split, checkpointing, offload or kernels. `extra`: KEY=VALUE train keys
    (defaults:compile=off, defaults:offload_activations=true), typed by the config as `slimtune train` types
    its overrides."""
    keys = {"batch_size": 16, "lr": 1e-4, "seed": 0, "max_steps": steps, "save_every": 0, "log_every": 1,
            "eval_at_start": "false"}
    return [f"train.{k}={v}" for k, v in keys.items()] + [f"train.{item}" for item in extra]


def defaults_worker(a, explicit: list[str] | None = None) -> dict:
    """slimtune through its public API (load_config, prepare, fit) as `slimtune train` runs a config that names
    only the method and the batch (the defaults recipe), or with every speed key set (`explicit`: the slimtune
    recipe). Step times from fit's metrics.jsonl (step_s per step)."""
    import statistics
    import tempfile

    import torch
    import yaml

    sys.path.insert(0, str(ROOT))
    import slimtune
    from slimtune.data.encode import Encoded
    from slimtune.runs.metrics_log import read_metrics
    from slimtune.kernels import linear_ce

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    steps, warmup = a.steps, a.warmup
    _, raw = _workload(a.size, 16 * (steps + warmup + 2), a.max_len)
    out = Path(tempfile.mkdtemp(prefix="speed-fit-"))
    base = out / "base.yaml"
    base.write_text(yaml.safe_dump({"method": {"name": a.method, "r": 16, "alpha": 16,  # dropout: the default, 0
                                               "target_modules": _targets(a.size)},
                                    "train": {"output_dir": str(out / "run")}, "data": {"max_len": a.max_len}}))
    keys = _defaults_train(steps + warmup, tuple(a.train_key))
    if explicit is not None:  # the slimtune recipe: its split and kernels, not the defaults' batch_size
        keys = [k for k in keys if not k.startswith("train.batch_size=")] + [f"train.{k}" for k in explicit]
    if a.profile:
        keys.append(f"train.profile_step={steps + warmup - 1}")  # the last two steps, in the run folder
    cfg = slimtune.load_config(base, keys)
    if a.no_cast_once:  # diagnostic: each adapter cast in every forward, recompute and backward
        from slimtune.kernels import lora_math
        lora_math.ENABLED = False
    probe = _gc_probe() if a.gc_probe else None
    if a.stacks:  # diagnostic: the profile's copies by the Python stack that made them
        from slimtune.engine import timing
        timing.STACKS = True
    if a.no_ahead:  # diagnostic: offloaded tensors brought back only when backward reads them
        from slimtune.engine import offload
        offload.AHEAD = False
    if a.chunk_bytes:
        linear_ce.CHUNK_BYTES = a.chunk_bytes
    model = _model(a.size, dev, meta=a.method == "qlora")
    n_params = sum(p.numel() for p in model.parameters())
    if a.method == "qlora":  # quantized while loading, as train loads it (the folder unsloth_recipe --make saves)
        from slimtune.methods.quant import quantization_config
        from slimtune.models import load
        model, _ = load(a.path, "bf16", False, dev, quantization_config(cfg.method, "bf16"))
    records = [Encoded(r["input_ids"], r["labels"], where=f"synthetic {i}") for i, r in enumerate(raw)]
    lines: list[str] = []

    def say(text: str) -> None:  # kept for the row, and on stderr at once (SPEED_LOG_DIR keeps it past a kill)
        lines.append(text)
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)
    batch = next((k.split("=", 1)[1] for k in a.train_key if k.startswith("batch_size=")), "16")
    shown = ", ".join(explicit) if explicit is not None else f"{a.method} + {batch} records a step" + \
        "".join(f", {k}" for k in a.train_key if not k.startswith("batch_size=")) + \
        (", offload's copy ahead off (diagnostic)" if a.no_ahead else "") + \
        (", adapter casts every pass (diagnostic)" if a.no_cast_once else "") + \
        (", gc probe (diagnostic)" if a.gc_probe else "")
    name = "slimtune" if explicit is not None else "slimtune defaults"
    row = dict(recipe=f"{name}{' qlora' if a.method == 'qlora' and explicit is not None else ''} ({shown})",
               size=a.size, params=n_params, max_len=a.max_len, lora_targets=_targets(a.size), r=16, train_keys=keys,
               device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", versions=_versions())
    try:
        model = slimtune.prepare(model, cfg, dev, log=say).model
        result = slimtune.fit(model, records, cfg, device=dev, log=say)
    except torch.OutOfMemoryError as err:
        return dict(row, real_tok_s=0, peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), mfu_real=0.0,
                    pad_fraction=0.0, error=f"out of memory: {str(err)[:200]}", log=lines[-20:])
    rows = [r for r in read_metrics(out / "run" / "metrics.jsonl") if "loss" in r]
    seen = [r["input_tokens_per_s"] * r["elapsed_s"] for r in rows]  # input tokens of the steps so far
    real, dt = seen[-1] - seen[warmup - 1], rows[-1]["elapsed_s"] - rows[warmup - 1]["elapsed_s"]
    times = [r["step_s"] for r in rows[warmup:]]
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
    kernels = {k: result[k] for k in ("packing", "chunked_loss", "fused_lora_layers", "fused_norm_mlp", "fused_rope",
                                      "tiled_mlp", "compiled_layers") if k in result}
    from torch._dynamo.utils import counters
    kernels["graphs"] = counters["stats"]["unique_graphs"]  # torch.compile's, over the whole run
    profile = out / "run" / "profile.txt"
    if a.profile and profile.is_file():
        Path(a.profile).write_text(profile.read_text())
    return dict(row, steps=len(times), real_tok_s=round(real / dt), pad_fraction=0.0,  # real: padding excluded
                peak_gib=round(peak, 2),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2) if dev == "cuda" else 0.0,
                mfu_real=round(real / dt * 4 * n_params / PEAK_FLOPS, 3),
                step_s_mean=round(statistics.mean(times), 4), step_s_median=round(statistics.median(times), 4),
                step_s_max=round(max(times), 4), slowest_step=warmup + 1 + times.index(max(times)),
                stalls=result.get("stalls", []), step_s=[round(t, 3) for t in times],
                data_s=[round(r["data_s"], 3) for r in rows[warmup:]],
                host_s=[round(r["host_s"], 3) for r in rows[warmup:]],
                gc_s=[round(r.get("gc_s", 0.0), 3) for r in rows[warmup:]],  # garbage collection in each step
                alloc_retries=sum(r.get("alloc_retries", 0) for r in rows[warmup:]),
                device_allocs=[r.get("device_allocs", 0) for r in rows[warmup:]],
                stall_causes=result.get("stall_causes", {}),
                alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),  # as slimtune's CLI: expandable segments
                losses=[round(r["loss"], 4) for r in rows[warmup:]], kernels=kernels,
                first_step_s=round(rows[0]["step_s"], 1),  # the compile, when on, is in it
                **({"gc_probe": probe} if probe is not None else {}),
                chose=[line for line in lines if "micro" in line or "fast path" in line or "packing" in line][:10])


def _gc_probe() -> list[dict]:
    """Diagnostic: for each full garbage collection during the run, what it had to scan (the tracked objects
    outside the frozen ones, by type), what it freed, its seconds and the other gc callbacks registered."""
    import collections
    import gc
    found: list[dict] = []

    def probe(phase: str, info: dict) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            objs = gc.get_objects(2)
            found.append({"at": time.time(), "scanned": len(objs), "frozen": gc.get_freeze_count(),
                          "types": collections.Counter(type(o).__name__ for o in objs).most_common(15),
                          "callbacks": [getattr(c, "__qualname__", repr(c))[:80] for c in gc.callbacks]})
            del objs
            found[-1]["t0"] = time.perf_counter()
        elif found:
            found[-1].update(s=round(time.perf_counter() - found[-1].pop("t0"), 4), collected=info.get("collected"),
                             uncollectable=info.get("uncollectable"))
    gc.callbacks.insert(0, probe)  # first: its own counting is outside the collection it times
    return found


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for p in ("torch", "transformers", "peft", "triton", "liger_kernel", "unsloth"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def _run(cmd: list[str], log, log_dir: str = "") -> list[dict]:
    """One recipe's process; its JSON result lines ('RESULT {...}' or '{...}'). With log_dir its stderr streams
    into a file there as it runs, so a process killed by a time limit still leaves what it had logged."""
    t0 = time.perf_counter()
    if log_dir:
        name = "_".join(c for c in cmd[2:] if not c.startswith("-"))[:80].replace("/", "_") or "run"
        path = Path(log_dir) / f"{name}-{int(time.time())}.log"
        with open(path, "w") as err:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        proc.stderr = f"(its log: {path})"
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    found = []
    for line in proc.stdout.splitlines():
        text = line[len("RESULT "):] if line.startswith("RESULT ") else line
        if text.startswith("{"):
            try:
                found.append(json.loads(text))
            except json.JSONDecodeError:
                pass
    log(f"{' '.join(cmd[1:])}: rc {proc.returncode}, {time.perf_counter() - t0:.0f}s, {len(found)} result(s)")
    if proc.returncode or not found:
        log(proc.stderr[-3000:])
    return found


def _append(rows: list[dict], out: str) -> None:
    """Results appended to --out (bench/results/<date>-<device>.jsonl by default)."""
    if not rows:
        return
    device = rows[0]["device"]
    slug = "h100" if "H100" in device else "h200" if "H200" in device else device.lower().replace(" ", "-")
    path = Path(out or HERE / "results" / f"{datetime.date.today()}-{slug}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        for r in rows:
            fh.write(json.dumps(dict(r, bench="speed", date=str(datetime.date.today()))) + "\n")


def recipe_commands(name: str, size: str, a) -> list[list[str]]:
    py = sys.executable
    steps = ["--steps", str(a.steps), "--warmup", str(a.warmup)]
    if name == "hf":
        return [[py, str(PEERS / "seed_recipe.py"), "--size", size, "--configs", "modern", *steps]]
    if name == "liger":
        return [[py, str(PEERS / "seed_recipe.py"), "--size", size, "--configs", "modern", "--liger", *steps]]
    if name == "unsloth":
        path = f"/dev/shm/m{size}"
        make = [] if Path(path, "config.json").exists() else \
            [[py, str(PEERS / "unsloth_recipe.py"), "--size", size, "--make", "--path", path]]
        return make + [[py, str(PEERS / "unsloth_recipe.py"), "--size", size, "--path", path,
                        "--modes", os.environ.get("UNSLOTH_MODES", "padded,padding_free"), *steps]]
    if name == "unsloth-qlora":
        path = f"/dev/shm/m{size}"
        return _make(size, path) + [[py, str(PEERS / "unsloth_recipe.py"), "--size", size, "--path", path,
                                     "--modes", os.environ.get("UNSLOTH_MODES", "padded,padding_free"),
                                     "--load-in-4bit", *steps]]
    base, *keys = name.split(":")  # defaults:compile=off: one train.* key set over the defaults
    flags = {"ahead=off": ("--no_ahead",), "cast_once=off": ("--no_cast_once",), "gc_probe": ("--gc_probe",),
             "stacks": ("--stacks",)}
    keys = [arg for k in keys for arg in (("--profile", k[8:]) if k.startswith("profile=") else flags[k]
                                          if k in flags else ("--train_key", k))]
    if base == "defaults":
        return [[py, str(Path(__file__)), "--worker", "--defaults", "--size", size, *steps, *keys]]
    if base == "defaults-qlora":  # load the saved folder unsloth's recipe also reads
        path = f"/dev/shm/m{size}"
        return _make(size, path) + [[py, str(Path(__file__)), "--worker", "--defaults", "--size", size, *steps,
                                     "--method", "qlora", "--path", path, *keys]]
    if name.startswith("slimtune"):
        extra = name.split(":")[1:]  # slimtune:packing=bins:loss=plain:compile
        args = [py, str(Path(__file__)), "--worker", "--size", size, *steps]
        if name.split(":")[0] == "slimtune-qlora":  # loads the saved folder unsloth's recipe also reads
            path = f"/dev/shm/m{size}"
            return _make(size, path) + [args + ["--method", "qlora", "--path", path] + _keys(extra)]
        return [args + _keys(extra)]
    raise SystemExit(f"unknown recipe {name}: hf, liger, unsloth, unsloth-qlora, defaults, defaults-qlora, "
                     "slimtune[:packing=..][:loss=..][:compile], slimtune-qlora[:...]")


def _make(size: str, path: str) -> list[list[str]]:
    """The command that saves the random model to `path` for the recipes that load a folder, unless done."""
    return [] if Path(path, "config.json").exists() else \
        [[sys.executable, str(PEERS / "unsloth_recipe.py"), "--size", size, "--make", "--path", path]]


def _keys(extra: list[str]) -> list[str]:
    """slimtune recipe keys (bs=16, offload) as worker flags (--bs 16, --offload)."""
    args = []
    for item in extra:
        key, _, value = item.partition("=")
        args += [f"--{key}"] + ([value] if value else [])
    return args


def table(rows: list[dict]) -> str:
    out = ["| recipe | size | real tok/s | peak GiB | MFU (4N) | pad fraction | steps | median / slowest step s |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        times = sorted(r.get("step_s") or [0.0])
        median = r.get("step_s_median", times[len(times) // 2])
        out.append(f"| {r['recipe']} | {r['size']} | {r['real_tok_s']:,} | {r['peak_gib']:.2f} | {r['mfu_real']:.3f} "
                   f"| {r['pad_fraction']:.2f} | {r.get('steps', '')} | {median:.3f} / {times[-1]:.3f} |")
    return "\n".join(out)


def ratios(rows: list[dict]) -> list[str]:
    lines = []
    for size in dict.fromkeys(r["size"] for r in rows):
        ours = [r for r in rows if r["size"] == size and r["recipe"].startswith("slimtune")]
        peers = [r for r in rows if r["size"] == size and not r["recipe"].startswith("slimtune") and r["real_tok_s"]]
        for o in ours:
            for p in peers:
                lines.append(f"{size}: {o['recipe']} / {p['recipe']}: speed {o['real_tok_s'] / p['real_tok_s']:.2f}x, "
                             f"memory {o['peak_gib'] / max(p['peak_gib'], 1e-9):.2f}x")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help="run slimtune's engine in this process")
    ap.add_argument("--defaults", action="store_true", help="worker: the defaults recipe (defaults_worker)")
    ap.add_argument("--size", default="1b")
    ap.add_argument("--sizes", default="1b")
    ap.add_argument("--recipes", default="slimtune,hf,liger,unsloth")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (20 give a median and a slowest step)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--ga", type=int, default=2)
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--packing", default="rows")
    ap.add_argument("--loss", default="auto")
    ap.add_argument("--compile", action="store_true", help="worker: train.compile=on")
    ap.add_argument("--compile_mode", default="auto", help="worker: train.compile when --compile is not given")
    ap.add_argument("--train_key", action="append", default=[], help="defaults worker: KEY=VALUE, a train.* key")
    ap.add_argument("--offload", action="store_true", help="train.offload_activations (engine/offload.py)")
    ap.add_argument("--fused_lora", default="auto")
    ap.add_argument("--method", default="lora", help="worker: lora, or qlora (4-bit base loaded from --path)")
    ap.add_argument("--path", default="", help="worker, qlora: the saved model folder to quantize while loading")
    ap.add_argument("--fused_norm_mlp", default="auto")
    ap.add_argument("--fused_rope", default="auto")
    ap.add_argument("--chunk_bytes", type=int, default=0, help="fp32 logits per loss chunk (kernels/linear_ce.py)")
    ap.add_argument("--profile", default="", help="worker: profile the last step, table to this file")
    ap.add_argument("--no_ahead", action="store_true", help="worker, diagnostic: engine/offload.py's AHEAD off")
    ap.add_argument("--no_cast_once", action="store_true",
                    help="worker, diagnostic: kernels/lora_math.py's ENABLED off (adapters cast every pass)")
    ap.add_argument("--gc_probe", action="store_true",
                    help="worker, diagnostic: what each full garbage collection scanned and freed (row gc_probe)")
    ap.add_argument("--stacks", action="store_true",
                    help="worker, with --profile: the profile also groups copies by the Python stack that made them")
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if a.worker:  # slimtune through its Python API, in the allocator setting `slimtune train` runs with (cli.main)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        run = defaults_worker if a.defaults else worker
        print(json.dumps(run(a)), flush=True)
        return 0
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for size in a.sizes.split(","):
        for name in a.recipes.split(","):
            for cmd in recipe_commands(name, size, a):
                found = _run(cmd, log, os.environ.get("SPEED_LOG_DIR", ""))
                _append(found, a.out)  # each recipe's rows at once: a time limit keeps the finished ones
                rows += found
    if not rows:
        return 1
    print(table(rows))
    print("\n".join(ratios(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
