"""What is alive at a cell's peak GPU memory: replays torch's allocator trace of two optimizer steps (as
bench/memory_grid.py runs a cell) and prints the live bytes at the peak grouped by the Python line that
allocated them. For estimator terms that do not scale as expected (full fine-tuning 1B vs 3B).

    python bench/memory_trace.py --shape 3b --method full --precision bf16 --mb 1 --len 384 [--ckpt]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_grid import GIB, build, cell  # noqa: E402  (sets PYTORCH_CUDA_ALLOC_CONF as the grid does)

import torch  # noqa: E402

import slimtune  # noqa: E402
from slimtune import config  # noqa: E402
from slimtune.engine import precision  # noqa: E402


def where(frames) -> str:
    """The innermost frame outside torch's own Python files, else the innermost frame."""
    py = [f for f in frames if f.get("filename", "").endswith(".py")]
    for f in py:
        if "/torch/" not in f["filename"]:
            return f"{Path(f['filename']).name}:{f.get('line')} {f.get('name')}"
    return f"{Path(py[0]['filename']).name}:{py[0].get('line')} {py[0].get('name')}" if py else "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="1b")
    ap.add_argument("--method", default="full")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--mb", type=int, default=1)
    ap.add_argument("--len", type=int, default=384)
    ap.add_argument("--ckpt", action="store_true")
    ap.add_argument("--out")
    a = ap.parse_args()
    plan = precision.choose_dtypes(a.precision, "cuda")
    model, mcfg = build(a.shape, a.method, plan, None)
    tc = config.TrainConfig(precision=a.precision, gradient_checkpointing=a.ckpt)
    model = slimtune.prepare(model, config.Config(method=mcfg, train=tc), "cuda", log=lambda *_: None).model
    model.train()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000)
    res = cell(model, plan, a.mb, a.len, model.config.vocab_size)
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak, when = {}, 0, 0, {}, 0
    for i, e in enumerate(snap["device_traces"][0]):
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], where(e.get("frames", [])))
            total += e["size"]
        elif e["action"] == "free_requested" and e["addr"] in live:
            total -= live.pop(e["addr"])[0]
        if total > peak:
            peak, when = total, i
            at_peak = dict(live)
    groups = collections.Counter()
    for size, w in at_peak.values():
        groups[w] += size
    rows = [dict(where=w, gib=round(b / GIB, 3)) for w, b in groups.most_common(12)]
    out = dict(shape=a.shape, method=a.method, precision=a.precision, mb=a.mb, len=a.len, ckpt=a.ckpt,
               peak_allocated_gib=round(res["peak_allocated_gib"], 3), traced_peak_gib=round(peak / GIB, 3),
               event=when, events=len(snap["device_traces"][0]), top=rows)
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "a") as fh:
            fh.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
