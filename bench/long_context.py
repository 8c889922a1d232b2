"""The longest single record that trains on one GPU, slimtune beside unsloth.

For a model shape of bench/peers/seed_recipe.py SIZES (default 8b, Llama-3.1-8B shapes, random weights saved
once to --model-dir by unsloth_recipe.py --make), with LoRA (bf16 base) and QLoRA (NF4 base), r=32 on the seven
projections (unsloth's published long-context figures use r=32, batch 1), under the whole GPU and under a
memory cap (torch.cuda.set_per_process_memory_fraction: 24 GiB stands for a consumer card), it finds the
longest record for which one training step (forward, backward, AdamW) runs:
  - doubling from 16k tokens in one process (lengths tried in order, the first failure ends it), then
  - bisecting between the longest that trained and the shortest that did not, one fresh process per try,
    down to --resolution tokens; a process that fails on memory (or any error) counts as "does not train".
It also times tokens/s at 16k (--timed steps after the first). --quick tries only 16k, 32k, 64k, 128k.
--from-tokens N starts the doubling at N (with --max-doublings 1: that one length, for a step that takes minutes);
a cell where every length tried trained is a lower bound too (">= N (every length tried trained)").
--predict (slimtune cells): slimtune's memory estimator (slimtune.engine.memory.estimate) first gives the longest
record whose predicted reserved peak fits the cap (the whole GPU: its memory less the CUDA context) and whose offloaded
layer inputs fit the CPU memory available less 10% (--host-gib to set it; the row's host_gib), checked on every
--resolution step from 16k and then every 1024 tokens within the last step that fits (the estimate drops where the
tiled MLP turns on past 24,576 tokens); one process then tries 16k (timed) and prediction - resolution, prediction,
prediction + resolution; if the lowest of those fails, bisection between it and the longest that trained follows.
--predict-only prints the predictions and those lengths without a GPU (--gpu-gib stands for the device's memory).
--one-record sdpa|cudnn (DIAGNOSTIC, slimtune cells): the record's attention through SDPA (torch's backend, or
cuDNN's first) instead of the varlen kernel (slimtune.kernels.attention.ONE_RECORD); the row says so.
--max-step-s (every tool): a step's time is projected from the last length that trained as t x (n' / n)^2; a length
projected past it (or past the run's time left) is not tried: first the longest length projected to fit is tried
instead, if 1.25x the last or more, then the row {"skipped": "time"} ends the process. A skipped length is no memory
failure: the cell records bounded_by_time and its longest_tokens is a lower bound (">= N (time)" in the table).

slimtune: slimtune.prepare with kernels (packing of the one record: varlen attention; chunked loss sized from
free memory; fused LoRA; tiled MLP past 24,576 tokens; Liger where installed), gradient checkpointing with
layer inputs offloaded to CPU memory (train.offload_activations): what `slimtune train` runs with
micro_batch_size=1, gradient_checkpointing=true, offload_activations=true.
unsloth: FastLanguageModel.from_pretrained(load_in_4bit for QLoRA, unsloth_tiled_mlp=True where the release has
it) + get_peft_model(use_gradient_checkpointing="unsloth") + for_training (what its trainer runs first), then the
same step written by hand (its patched forward with labels: its chunked loss), imported before transformers in its
own process as unsloth requires; its per-layer torch.compile (UNSLOTH_BLOCK_COMPILE, on from torch 2.11) is off
unless the environment sets it: with the tiled MLP inside a compiled layer the first backward raises "A view was
created in no_grad mode ..." (_unsloth_model says why); the row's load.kernels records both settings.

  python bench/long_context.py --make                     # save the random 8B model folder (once)
  python bench/long_context.py --quick --budget-s 540     # the fixed list, every cell
  python bench/long_context.py --tools slimtune --methods qlora --caps 24 --budget-s 500 --predict
  python bench/long_context.py --predict-only --gpu-gib 80 --caps 0,24     # the predictions, on any machine

Each cell (tool, method, cap) appends one jsonl line like bench/speed.py's to bench/results/<date>-<device>.jsonl
(or --out), with every length tried; --budget-s bounds the whole run (cells left are reported as not run).
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
from typing import Callable

import long_predict
from long_predict import ALL_LINEAR, GIB, near, projected_s, stretch
from table import lower_bound

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
ROOT = HERE.parent
QUICK = [16384, 32768, 65536, 131072]
DEV = "cuda"  # tests/test_bench_long_context.py runs the step loop on "cpu"


def _record(n: int, vocab: int, prompt: int = 64):
    """One record of n tokens, the first `prompt` masked (an instruction), the rest trained."""
    import torch

    g = torch.Generator().manual_seed(n)
    ids = torch.randint(10, vocab - 10, (n,), generator=g)
    labels = ids.clone()
    labels[:prompt] = -100
    return ids, labels


def _cap(gib: float) -> None:
    import torch

    if gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * GIB / total))


def _slimtune_model(a):
    """(model, step) for slimtune: step(n) trains one record of n tokens."""
    import torch

    sys.path.insert(0, str(ROOT))
    import slimtune
    from slimtune import models
    from slimtune.data import pack
    from slimtune.data.encode import Encoded
    from slimtune.engine import loop
    from slimtune.engine.optim import build_optimizer, build_scheduler
    from slimtune.methods.quant import quantization_config

    cfg = long_predict.slimtune_config(a.method, a.r, max(a.lengths))
    from slimtune.kernels import attention
    attention.ONE_RECORD = a.one_record  # diagnostic: the record's attention through SDPA instead of varlen
    model, _ = models.load(a.model_dir, "bf16", device=DEV, quantization=quantization_config(cfg.method, "bf16"))
    prep = slimtune.prepare(model, cfg, DEV, log=lambda *_: None, kernels=True)
    model, took = prep.model, prep.kernels
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, 100, cfg.train)
    context = loop.forward_context(prep.dtypes, DEV, True, model)
    vocab = model.get_input_embeddings().weight.shape[0]
    model.train()

    def step(n: int) -> None:
        ids, labels = _record(n, vocab)
        batch = {k: v.to(DEV) if torch.is_tensor(v) else v
                 for k, v in pack.collate([Encoded(ids.tolist(), labels.tolist())]).items()}
        loop.step(model, [batch], optimizer, scheduler, 1.0, context, None, guard=True, chunked=took.chunked_loss)

    return took.as_dict(), step


def _unsloth_model(a):
    # Per-layer torch.compile off (unsloth compiles each decoder layer from torch 2.11: models/_block_compile.py,
    # llama.py _legacy_block_compile). Its tiled MLP (a torch.autograd.Function whose backward runs the LoRA MLP
    # again chunk by chunk) breaks the compiled layer and runs eagerly on the compiled graph's output, a tensor whose
    # base requires grad; the fused LoRA MLP's backward writes dX into its input in place (kernels/fast_lora.py,
    # out=X), i.e. into that base, under a chunk view the tiled backward made in no_grad mode, and autograd refuses:
    # "A view was created in no_grad mode and its base ... has been modified inplace". Eager, the MLP's input is
    # the fast RMS norm's output, a view of a buffer that needs no grad, and the same code trains.
    os.environ.setdefault("UNSLOTH_BLOCK_COMPILE", "0")
    import unsloth  # noqa: F401  (before transformers, as unsloth requires)
    from unsloth import FastLanguageModel
    import torch

    load = dict(max_seq_length=max(a.lengths), dtype=torch.bfloat16, load_in_4bit=a.method == "qlora",
                full_finetuning=False)
    tiled = True
    try:  # its long-context setting (off by default): the MLP in ceil(tokens / hidden) slices
        model, _ = FastLanguageModel.from_pretrained(a.model_dir, unsloth_tiled_mlp=True, **load)
    except TypeError:  # a release before the option
        tiled = False
        model, _ = FastLanguageModel.from_pretrained(a.model_dir, **load)
    model = FastLanguageModel.get_peft_model(model, r=a.r, lora_alpha=a.r, lora_dropout=0, bias="none",
                                             target_modules=ALL_LINEAR, use_gradient_checkpointing="unsloth",
                                             random_state=3407, max_seq_length=max(a.lengths))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.get_input_embeddings().weight.shape[0]
    if hasattr(FastLanguageModel, "for_training"):  # what its trainer runs first: train mode, checkpointing, no cache
        FastLanguageModel.for_training(model)
    else:  # an older release
        model.train()

    def step(n: int) -> None:
        ids, labels = _record(n, vocab)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids[None].cuda(), labels=labels[None].cuda()).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"gradient_checkpointing": "unsloth", "tiled_mlp": tiled,
            "block_compile": os.environ["UNSLOTH_BLOCK_COMPILE"] != "0"}, step


def _oom(err: BaseException) -> bool:
    return "out of memory" in str(err).lower() or type(err).__name__ == "OutOfMemoryError"


def trial(a) -> None:
    """Worker: train one step at each of a.lengths in order (_steps)."""
    began = time.perf_counter()
    if a.tool == "unsloth":
        os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1")
        _cap(a.cap_gib)  # torch is imported by _cap; unsloth patches transformers, imported after it
        kernels, step = _unsloth_model(a)
    else:
        _cap(a.cap_gib)
        kernels, step = _slimtune_model(a)
    import torch

    cuda = DEV == "cuda"
    alloc = round(torch.cuda.memory_allocated() / GIB, 2) if cuda else 0.0
    print("LOADED " + json.dumps({"kernels": kernels, "alloc_gib": alloc}), flush=True)
    _steps(a, step, began + a.time_left - 10 if a.time_left else float("inf"))


def _steps(a, step: Callable[[int], None], end: float) -> None:
    """A RESULT line per length, ascending; the first failure ends it, and so does a length projected to take more
    than --max-step-s or the time left before `end` (a row skipped for time, after trying the longest length
    projected to fit where that is STRETCH times the last or more)."""
    todo, last = list(a.lengths), None  # last: (seconds, tokens) of the last length that trained
    while todo:
        if last and projected_s(*last, todo[0]) > (limit := min(a.max_step_s, end - time.perf_counter())):
            m = stretch(*last, limit)
            if not m or m >= todo[0]:
                _emit({"tokens": todo[0], "ok": False, "skipped": "time",
                       "projected_s": round(projected_s(*last, todo[0]), 1), "limit_s": round(limit, 1)})
                return
            todo.insert(0, m)
        row = _one(a, todo.pop(0), step)
        _emit(row)
        if not row["ok"]:
            return
        last = (row.get("step_s") or row["first_step_s"], row["tokens"])


def _emit(row: dict) -> None:
    print("RESULT " + json.dumps(row), flush=True)


def _one(a, n: int, step: Callable[[int], None]) -> dict:
    """One step at n tokens (and --timed more at --tps-at): its row."""
    import torch

    cuda = DEV == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    row = {"tokens": n}
    try:
        t0 = time.perf_counter()
        step(n)
        sync()
        row.update(ok=True, first_step_s=round(time.perf_counter() - t0, 2))
        if n == a.tps_at and a.timed:
            t0 = time.perf_counter()
            for _ in range(a.timed):
                step(n)
            sync()
            took = time.perf_counter() - t0
            row.update(tok_s=round(n * a.timed / took), step_s=round(took / a.timed, 3))
    except Exception as err:  # OOM above all; anything else ends the search at this length too
        row.update(ok=False, oom=_oom(err), error=f"{type(err).__name__}: {str(err)[:300]}")
    row["peak_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2) if cuda else 0.0
    if cuda:  # what the estimate (predicted_gib) predicts, and what the cap bounds
        row["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    return row


def _spawn(a, tool: str, method: str, cap: float, lengths: list[int], timeout: float, log) -> tuple[list, dict]:
    cmd = [sys.executable, str(Path(__file__)), "--trial", "--tool", tool, "--method", method, "--cap-gib", str(cap),
           "--lengths", ",".join(map(str, lengths)), "--model-dir", a.model_dir, "--r", str(a.r),
           "--tps-at", str(a.tps_at), "--timed", str(a.timed), "--max-step-s", str(a.max_step_s),
           "--time-left", str(max(timeout, 1)), "--one-record", a.one_record]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=max(timeout, 1))
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, rc = _text(exc.stdout), _text(exc.stderr) + "\n(timed out)", "timeout"
    rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    info = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("LOADED ")), {})
    nxt = next((n for n in lengths if n > max((r["tokens"] for r in rows), default=0)), lengths[-1])
    if rc == "timeout" and all(r["ok"] for r in rows):  # the run's time ran out: no answer about memory
        rows.append({"tokens": nxt, "ok": False, "skipped": "deadline"})
    elif rc not in (0, "timeout") and all(r["ok"] for r in rows):  # died outside a step (load, CUDA abort)
        rows.append({"tokens": nxt, "ok": False, "error": f"process exit {rc}: {err[-300:]}"})
    log(f"{tool} {method} cap={cap or 'full'} {lengths}: rc {rc}, {time.perf_counter() - t0:.0f}s, "
        + ", ".join(f"{r['tokens']}:{'ok' if r['ok'] else r.get('skipped', 'fail')}" for r in rows))
    if rc != 0 and not rows:
        log(err[-2000:])
    return rows, info


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def _bracket(tried: list[dict]) -> tuple[int, int]:
    """(the longest length that trained, the shortest that failed), 0 for none; a length skipped for time is
    neither."""
    good = max((r["tokens"] for r in tried if r["ok"]), default=0)
    bad = min((r["tokens"] for r in tried if not r["ok"] and not r.get("skipped")), default=0)
    return good, bad


def search(a, tool: str, method: str, cap: float, deadline: float, log, predicted: int = 0) -> dict:
    """One cell within the time left: doubling (or the lengths near `predicted`) in one process, then bisecting
    one fresh process per length while the bracket is wider than --resolution and no length was skipped for time."""
    ladder = QUICK if a.quick else near(predicted, a.resolution) if predicted else \
        [a.from_tokens * 2**i for i in range(a.max_doublings)]
    tried, info = _spawn(a, tool, method, cap, ladder, deadline - time.perf_counter(), log)
    good, bad = _bracket(tried)
    while (not a.quick and good and bad and bad - good > a.resolution and time.perf_counter() < deadline - 30
           and not any(r.get("skipped") for r in tried)):
        mid = (good + bad) // 2 // 1024 * 1024
        t = next(r.get("step_s") or r["first_step_s"] for r in tried if r["ok"] and r["tokens"] == good)
        if (took := projected_s(t, good, mid)) > a.max_step_s:
            tried.append({"tokens": mid, "ok": False, "skipped": "time", "projected_s": round(took, 1)})
            break
        rows, _ = _spawn(a, tool, method, cap, [mid], deadline - time.perf_counter(), log)
        tried += rows or [{"tokens": mid, "ok": False, "error": "no result"}]
        good, bad = _bracket(tried)
    tps = next((r.get("tok_s") for r in tried if r["tokens"] == a.tps_at and r.get("tok_s")), None)
    timed_out = any(r.get("skipped") for r in tried)
    return {"longest_tokens": good, "shortest_failed": bad or None, "tok_s_at_16k": tps, "tried": tried,
            "load": info, "bounded": not a.quick and bool(bad) and bad - good > a.resolution,
            "bounded_by_time": timed_out}


def _device(gpu_gib: float) -> tuple[str, float]:
    """(the GPU's name, its memory in GiB); without CUDA ("cpu", --gpu-gib), for --predict-only."""
    import torch

    if not torch.cuda.is_available():
        if not gpu_gib:
            sys.exit("long_context.py: no CUDA device; give --gpu-gib N (with --predict-only) to predict for a GPU "
                     "of N GiB")
        return "cpu", gpu_gib
    props = torch.cuda.get_device_properties(0)
    return props.name, props.total_memory / GIB


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="8b")
    ap.add_argument("--model-dir", default="")
    ap.add_argument("--make", action="store_true", help="save the random model folder for --size and stop")
    ap.add_argument("--tools", default="slimtune,unsloth")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--caps", default="0,24", help="GiB per process (0 = the whole GPU)")
    ap.add_argument("--quick", action="store_true", help="only 16k, 32k, 64k, 128k; no bisection")
    ap.add_argument("--predict", action="store_true", help="slimtune cells: try only lengths near the estimator's")
    ap.add_argument("--predict-only", action="store_true", help="print each slimtune cell's prediction and stop")
    ap.add_argument("--gpu-gib", type=float, default=0, help="the GPU's memory for the prediction (default: its own)")
    ap.add_argument("--host-gib", type=float, default=0,
                    help="the CPU memory the prediction's offloaded inputs may take (default: what is available)")
    ap.add_argument("--max-step-s", type=float, default=240, help="skip a length projected to train slower than this")
    ap.add_argument("--budget-s", type=float, default=540, help="seconds for the whole run")
    ap.add_argument("--resolution", type=int, default=8192, help="bisect until the bracket is this narrow")
    ap.add_argument("--max-doublings", type=int, default=6, help="--from-tokens x 2^i for i below this")
    ap.add_argument("--from-tokens", type=int, default=16384,
                    help="the doubling's first length (a whole-GPU cell: one long length in a call of its own)")
    ap.add_argument("--r", type=int, default=32)
    ap.add_argument("--tps-at", type=int, default=16384)
    ap.add_argument("--timed", type=int, default=2, help="steps timed at --tps-at after the first")
    ap.add_argument("--out", default="")
    ap.add_argument("--one-record", default="varlen", choices=("varlen", "sdpa", "cudnn"),
                    help="DIAGNOSTIC, slimtune cells: the record's attention (slimtune.kernels.attention.ONE_RECORD)")
    ap.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tool", default="slimtune", help=argparse.SUPPRESS)
    ap.add_argument("--method", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--cap-gib", type=float, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--lengths", default="16384", help=argparse.SUPPRESS)
    ap.add_argument("--time-left", type=float, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.model_dir = a.model_dir or f"/dev/shm/long-{a.size}"
    a.lengths = [int(x) for x in a.lengths.split(",")]
    a.predict = a.predict or a.predict_only
    return a


def _longest(r: dict) -> str:
    """The table's longest-tokens cell: a lower bound where a length was skipped for time."""
    if "longest_tokens" not in r:
        return str(r.get("not_run"))
    if lower_bound(r):
        return f">= {r['longest_tokens']} ({'time' if r.get('bounded_by_time') else 'every length tried trained'})"
    return str(r["longest_tokens"])


def table(rows: list[dict]) -> str:
    lines = ["| tool | method | cap GiB | longest tokens | first failure | predicted (GiB) | tok/s at 16k |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        pred = f"{r['predicted_tokens']} ({r['predicted_gib']})" if "predicted_tokens" in r else ""
        lines.append(f"| {r['tool']} | {r['method']} | {r['cap_gib']} | {_longest(r)} | {r.get('shortest_failed')} | "
                     f"{pred} | {r.get('tok_s_at_16k')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    a = _args(argv)
    if a.trial:
        trial(a)
        return 0
    start = time.perf_counter()  # the budget counts the model folder's making too
    if not a.predict_only and (a.make or not Path(a.model_dir, "config.json").exists()):
        subprocess.run([sys.executable, str(PEERS / "unsloth_recipe.py"), "--size", a.size, "--make", "--path",
                        a.model_dir, "--max_pos", str(1 << 20)], check=True, cwd=ROOT)
        if a.make:
            return 0
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    deadline = start + a.budget_s
    device, total = _device(a.gpu_gib)
    mcfg = long_predict.model_config(a.model_dir, a.size) if a.predict else None
    date = str(datetime.date.today())
    slug = "h100" if "H100" in device else "h200" if "H200" in device else device.lower().replace(" ", "-")
    out = Path(a.out or HERE / "results" / f"{date}-{slug}.jsonl")
    rows = []
    from slimtune.engine import host_memory  # the CPU memory the offloaded layer inputs may take
    host = a.host_gib or (host_memory.available() or 0) / GIB
    for cap in (float(c) for c in a.caps.split(",")):
        for method in a.methods.split(","):
            for tool in a.tools.split(","):
                row = dict(bench="long_context", date=date, device=device, gpu_gib=round(total, 1), size=a.size,
                           tool=tool, method=method, r=a.r, cap_gib=cap or round(total, 1), quick=a.quick,
                           **({"one_record": a.one_record} if tool == "slimtune" and a.one_record != "varlen" else {}))
                if a.predict and tool == "slimtune" and not a.quick:
                    pred, gib = long_predict.predict(method, a.r, cap, a.gpu_gib or total, mcfg, a.resolution,
                                                     host_gib=host)
                    row.update(predicted_tokens=pred, predicted_gib=gib, host_gib=round(host, 1),
                               predicted_offload_gib=long_predict.offloaded_gib(pred, mcfg))
                if a.predict_only:
                    if "predicted_tokens" in row:
                        print(json.dumps(dict(row, lengths=near(pred, a.resolution) if pred else None)), flush=True)
                    continue
                if time.perf_counter() > deadline - 60:
                    row["not_run"] = "--budget-s spent"
                else:
                    row.update(search(a, tool, method, cap, deadline, log, row.get("predicted_tokens", 0)))
                rows.append(row)
                out.parent.mkdir(parents=True, exist_ok=True)
                with out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
    if rows:
        print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
