"""GGUF export time, file size and held-out loss per quant type, on the embedded SmolLM2-135M-Instruct.

    python bench/gguf_export.py [--no-loss] [--quants q4_0,q4_k_m] [--imatrix train|off|both]
                                [--out bench/results/2026-12-03-cpu-gguf_export.jsonl]
Exports the embedded model's folder (a plain transformers folder, so no merge) with `write_gguf` in each
--quant, then loads each file back through transformers' GGUF reader and measures the loss on the
demo's 24 held-out records (identity + alpaca), tokenized by the source tokenizer so that only the
weights differ. q4_0 and q4_k_m get the importance matrix from the demo's training records (disjoint
from the held-out ones; --imatrix off: none, both: one row each). One JSON line per file, appended.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from slimtune import config as config_mod  # noqa: E402
from slimtune.export.gguf import IMATRIX_QUANTS, QUANTS, write_gguf  # noqa: E402

OUT = Path(__file__).parent / "results" / "2026-12-03-cpu-gguf_export.jsonl"


def held_loss(model, tokenizer, held) -> float:
    from slimtune.evaluate.report import evaluate_run

    cfg = config_mod.load(None, ["model.path=embedded", "data.max_len=256"])
    with torch.no_grad():
        return evaluate_run(model.eval(), tokenizer, cfg, held).scores["eval_loss"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-loss", action="store_true", help="time and size only (no load back)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--quants", default=",".join(QUANTS), help="comma-separated --quant types")
    ap.add_argument("--imatrix", default="train", choices=["train", "off", "both"])
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slimtune import models
    from slimtune.data import read
    from slimtune.demo import make_data

    folder = models.resolve("embedded")
    tmp = Path(tempfile.mkdtemp(prefix="gguf-bench-"))
    train, held_path = make_data(tmp / "data")
    held = read(held_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    meta = {"date": "2026-12-03", "device": "cpu", "model": "embedded SmolLM2-135M-Instruct", "torch_threads":
            torch.get_num_threads(), "held_out_records": len(held)}

    def emit(row: dict) -> None:  # appended as soon as measured: a long run cut short keeps its rows
        print(json.dumps(row))
        with open(args.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({**meta, **row}) + "\n")

    if not args.no_loss:
        ref = held_loss(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), tokenizer, held)
        emit({"quant": "source fp32 folder", "eval_loss": ref})
    choices = {"train": [str(train)], "off": ["off"], "both": [str(train), "off"]}[args.imatrix]
    runs = [(q, c) for q in args.quants.split(",") for c in (choices if q in IMATRIX_QUANTS else ["off"])]
    for quant, imatrix in runs:
        path = tmp / f"smollm2-{quant}.gguf"
        start = time.perf_counter()
        result = write_gguf(folder, path, quant, log=print, imatrix=imatrix)
        row = {"quant": quant, "export_s": round(time.perf_counter() - start, 2), "bytes": path.stat().st_size,
               "mib": round(path.stat().st_size / 2**20, 1), "tensor_types": result["tensor_types"],
               "imatrix": "demo train.jsonl" if imatrix != "off" and quant in IMATRIX_QUANTS else "off",
               "imatrix_used": result["imatrix"]}
        if not args.no_loss:
            start = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=path.name, dtype=torch.float32)
            row["load_s"] = round(time.perf_counter() - start, 2)
            row["eval_loss"] = held_loss(model, tokenizer, held)
            row["vs_source"] = round(row["eval_loss"] / ref - 1, 4)
        emit(row)
        path.unlink()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
