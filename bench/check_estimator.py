"""Predicted (slimtune.engine.memory) against measured (bench/memory_grid.py) peak memory, cell by cell.

    python bench/check_estimator.py bench/results/memory_grid_1b.jsonl [bench/results/memory_grid_8b.jsonl]
Prints every cell and a summary: |predicted - measured| / measured over the cells that ran, and whether
each cell predicted not to fit really ran out of memory. Runs on the CPU (meta-device models).
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_grid import SHAPES, method_cfg  # noqa: E402

from slimtune import config  # noqa: E402
from slimtune.engine.memory import GIB, estimate  # noqa: E402


def model_dir(shape: str, cache: dict) -> str:
    if shape not in cache:
        from transformers import LlamaConfig

        folder = tempfile.mkdtemp(prefix=f"cfg-{shape}-")
        LlamaConfig(**SHAPES[shape]).save_pretrained(folder)
        cache[shape] = folder
    return cache[shape]


def main(paths: list[str]) -> int:
    cache: dict = {}
    errs, wrong_fit, out = [], [], []
    for path in paths:
        for line in open(path):
            r = json.loads(line)
            cfg = config.Config()
            cfg.model.path = model_dir(r["shape"], cache)
            cfg.method = method_cfg(r["method"])
            cfg.train.precision, cfg.train.micro_batch_size = r["precision"], r["mb"]
            cfg.train.gradient_checkpointing, cfg.data.max_len = r["ckpt"], r["len"]
            if r.get("engine") == "fast":  # one packed row of mb records (memory_grid.py --engine fast)
                cfg.train.packing, cfg.train.offload_activations = "rows", r.get("offload", False)
                cfg.train.fused_norm_mlp = "on" if r.get("fused_norm_mlp") else "off"
            else:  # padded rows, plain loss, peft's own LoRA layers
                cfg.train.packing, cfg.train.loss, cfg.train.fused_lora = "off", "plain", "off"
            est = estimate(cfg, [(r["len"], r["len"] - r["len"] // 2)] * r["mb"])
            pred = est.peak / GIB
            fits = est.peak + est.cuda_context <= r["device_total_gib"] * GIB
            row = dict(shape=r["shape"], method=r["method"], precision=r["precision"], engine=r.get("engine", "plain"),
                       offload=r.get("offload", False), ckpt=r["ckpt"], mb=r["mb"],
                       len=r["len"], predicted_gib=round(pred, 3), predicted_fits=fits, oom=r["oom"])
            if r["oom"]:
                if fits:
                    wrong_fit.append(row)
            else:
                meas = r["peak_reserved_gib"]
                row.update(measured_reserved_gib=round(meas, 3),
                           measured_allocated_gib=round(r["peak_allocated_gib"], 3),
                           predicted_allocated_gib=round(est.peak_allocated / GIB, 3),
                           rel_err=round((pred - meas) / meas, 4))
                errs.append(abs(row["rel_err"]))
                if not fits:
                    wrong_fit.append(row)
            out.append(row)
            print(json.dumps(row))
    within = sum(e <= 0.10 for e in errs)
    print(f"summary: {len(errs)} cells ran; |pred-meas|/meas: max {max(errs):.3f}, mean {sum(errs)/len(errs):.3f}; "
          f"{within}/{len(errs)} within 10%; {sum(r['oom'] for r in out)} OOM cells; "
          f"{len(wrong_fit)} cells where the fit/no-fit prediction was wrong")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
