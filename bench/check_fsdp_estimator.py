"""The estimator's per-GPU prediction, as it is now, beside every committed bench/fsdp_speed.py result.

fsdp_speed.py records the prediction of the estimator it ran with, whose FSDP2 terms may differ from the
current ones. This script rebuilds each run's micro-batches exactly as its worker did (same synthetic
records, same seeded stream, the largest micro-batch of the warm-up and timed steps) and asks the current
`memory.estimate(cfg, rows, gpus)`, on the CPU (the model is built on the meta device).

  python bench/check_fsdp_estimator.py bench/results/2026-11-28-h200x*.jsonl \
      --profiled bench/results/2026-11-28-h200x4-c.jsonl
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE / "peers"))
sys.path.insert(0, str(HERE))


def knobs(row: dict) -> tuple[int, int]:
    """train.fsdp_reshard and train.fsdp_prefetch of a run: as fsdp_speed.py records them now; older
    rows only name them in the recipe (fsdp_speed._knobs wrote them there)."""
    if "fsdp_reshard" in row:
        return row["fsdp_reshard"], row.get("fsdp_prefetch", 0)
    recipe = row["recipe"]
    group = re.search(r"resharded to (\d+) GPUs", recipe)
    reshard = 1 if "kept whole" in recipe else int(group.group(1)) if group else 0
    ahead = re.search(r"prefetch (\d+) layers", recipe)
    return reshard, int(ahead.group(1)) if ahead else 0


def predict(row: dict, shape_dirs: dict, profiled: bool) -> dict:
    """Today's prediction (reserved and allocated GiB) for one fsdp_speed result row."""
    from fsdp_speed import _config
    from seed_recipe import SIZES, synthetic_examples
    from transformers import LlamaConfig

    from slimtune.data.encode import Encoded
    from slimtune.data.stream import micro_batches
    from slimtune.engine import memory

    size, gpus = row["size"], row["gpus"]
    if size not in shape_dirs:
        shape_dirs[size] = tempfile.mkdtemp(prefix=f"shape-{size}-")
        LlamaConfig(**SIZES[size], max_position_embeddings=4096).save_pretrained(shape_dirs[size])
    steps, warmup = row["steps"] + int(profiled), 2  # a profiled step is untimed, but it ran
    args = argparse.Namespace(method=row["method"], per_gpu=row["per_gpu"], offload="offload" in row["recipe"],
                              steps=steps, warmup=warmup, max_len=row["max_len"])
    cfg = _config(args, gpus, shape_dirs[size])
    reshard, prefetch = knobs(row)
    cfg = replace(cfg, train=replace(cfg.train, precision="bf16",  # as the GPU run trained (_config says fp32 here)
                                     fsdp_reshard=reshard, fsdp_prefetch=prefetch))
    n = cfg.train.micro_batch_size * (steps + warmup + 1)
    records = [Encoded(r["input_ids"], r["labels"]) for r in synthetic_examples(n, row["max_len"])]
    stream = micro_batches(records, cfg.train, row["max_len"], "rows")
    worst = max((next(stream) for _ in range(steps + warmup)), key=lambda m: sum(len(r.input_ids) for r in m))
    est = memory.estimate(cfg, [(len(r.input_ids), sum(x != -100 for x in r.labels)) for r in worst], gpus)
    return {"predicted_reserved_gib": round(est.peak / 2**30, 2),
            "predicted_allocated_gib": round(est.peak_allocated / 2**30, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", nargs="+")
    ap.add_argument("--profiled", nargs="*", default=[], help="result files whose runs profiled one extra step "
                    "(rows that carry profiled_steps say so themselves)")
    ap.add_argument("--out", default=str(HERE / "results" / f"{datetime.date.today()}-cpu-fsdp_estimator_check.jsonl"))
    a = ap.parse_args(argv)
    shapes: dict = {}
    out = []
    for path in a.results:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if row.get("bench") != "fsdp_speed" or "per_gpu" not in row:
                continue  # the peer's rows
            now = predict(row, shapes, bool(row.get("profiled_steps")) or path in a.profiled)
            err = 100 * (now["predicted_reserved_gib"] / row["peak_reserved_gib"] - 1)
            err_alloc = 100 * (now["predicted_allocated_gib"] / row["peak_gib"] - 1)
            reshard, prefetch = knobs(row)
            out.append(dict(source=Path(path).name, recipe=row["recipe"], gpus=row["gpus"], method=row["method"],
                            fsdp_reshard=reshard, fsdp_prefetch=prefetch,
                            measured_allocated_gib=row["peak_gib"], measured_reserved_gib=row["peak_reserved_gib"],
                            predicted_then_gib=row.get("predicted_reserved_gib"), **now,
                            reserved_error_pct=round(err, 1), allocated_error_pct=round(err_alloc, 1)))
            knob = (f", fsdp_reshard={reshard}" if reshard else "") + (f", prefetch={prefetch}" if prefetch else "")
            print(f"{out[-1]['source']}: {row['method']} on {row['gpus']} GPU(s){knob}: "
                  f"measured {row['peak_reserved_gib']} GiB reserved ({row['peak_gib']} allocated), "
                  f"predicted now {now['predicted_reserved_gib']} "
                  f"({err:+.1f}%; {now['predicted_allocated_gib']} allocated, {err_alloc:+.1f}%)")
    with open(a.out, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
