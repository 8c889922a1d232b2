"""Same data, same loss curve: slimtune's training loop beside recipe (1), the transformers Trainer + peft.

Both start from the same model folder and the same LoRA initialisation (peft's, under the same seed), train
on the same records in the same micro-batches (slimtune's seeded order, handed to the Trainer in sequence),
with the same AdamW, linear schedule and gradient clipping; the loss of each optimizer step is the mean over
that step's answer tokens in both (the Trainer divides by num_items_in_batch). slimtune runs padded and,
with train.packing=on, in packed rows. The curves should agree to float noise.

    python bench/loss_curve.py                       # the embedded model on real alpaca data, 50 steps (CPU)
    python bench/loss_curve.py --model DIR --data F  # any model folder and data file

Prints each step's losses and the largest relative difference; with --out, appends one JSON line per
run. tests/engine/test_loss_curve.py runs the same functions on a tiny random model.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import slimtune  # noqa: E402
from slimtune import config as config_mod, models  # noqa: E402
from slimtune.data import encode_examples, read  # noqa: E402
from slimtune.data.collate import pad_id  # noqa: E402
from slimtune.data.stream import micro_batches  # noqa: E402
from slimtune.runs.metrics_log import read_metrics  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def settings(bs: int = 2, ga: int = 2, steps: int = 50, lr: float = 2e-4, r: int = 8, max_len: int = 256,
             seed: int = 0, packing: str = "off") -> config_mod.Config:
    """The run both recipes follow: LoRA r on all linear layers, no dropout (no RNG to line up), linear
    decay without warm-up, clipping at 1.0, fp32 on the CPU, no checkpointing (it changes no number)."""
    return config_mod.from_dict({
        "method": {"name": "lora", "r": r, "alpha": 2 * r, "dropout": 0.0, "target_modules": TARGETS},
        "data": {"max_len": max_len},
        "train": {"micro_batch_size": bs, "grad_accum": ga, "max_steps": steps, "lr": lr, "scheduler": "linear",
                  "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "precision": "fp32",
                  "device": "cpu", "seed": seed, "gradient_checkpointing": False, "packing": packing,
                  "save_every": 0, "eval_at_start": False}})


def encoded(model_dir: str, data: str, cfg, limit: int = 0):
    """The records slimtune trains on (chat template, prompt masked), and the tokenizer's pad id."""
    tokenizer = models.load_tokenizer(model_dir)
    records, _ = encode_examples(read(data, "auto", limit), tokenizer, cfg.data)
    return records, pad_id(tokenizer)


def _adapted(model_dir: str, cfg):
    model, _ = models.load(model_dir, "fp32", False, "cpu")
    # seeded with train.seed before the method: the LoRA A matrices are the same draws in both recipes
    return slimtune.prepare(model, cfg, "cpu", log=lambda *a: None).model


def slimtune_curve(model_dir: str, records, pad: int, cfg) -> list[float]:
    model = _adapted(model_dir, cfg)
    with tempfile.TemporaryDirectory() as out:
        slimtune.fit(model, records, cfg, out_dir=out, pad_id=pad, log=lambda *a: None)
        return [r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]


def hf_curve(model_dir: str, records, pad: int, cfg) -> list[float]:
    """Recipe (1) on slimtune's micro-batches, in their order (a sequential sampler over them)."""
    from torch.utils.data import SequentialSampler
    from transformers import Trainer, TrainingArguments

    tc = cfg.train
    stream = micro_batches(records, tc, cfg.data.max_len, "off")  # the padded loop's own order
    # one dataset item per micro-batch (an epoch's last one can be short), handed over one at a time
    micro = [[{"input_ids": r.input_ids, "labels": r.labels} for r in next(stream)]
             for _ in range(tc.max_steps * tc.grad_accum)]

    def collate(items):
        (feats,) = items
        width = max(len(f["input_ids"]) for f in feats)
        ids = torch.full((len(feats), width), pad)
        labels = torch.full((len(feats), width), -100)
        mask = torch.zeros((len(feats), width), dtype=torch.long)
        for i, f in enumerate(feats):
            n = len(f["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(f["input_ids"]), torch.tensor(f["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    losses: list[float] = []

    class InOrder(Trainer):
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = out[0] if return_outputs else out
            losses.append(float(loss.detach()))  # this micro-batch's share of the step's mean
            return out

    model = _adapted(model_dir, cfg)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=tc.grad_accum,
            max_steps=tc.max_steps, learning_rate=tc.lr, lr_scheduler_type="linear", warmup_steps=0,
            weight_decay=tc.weight_decay, max_grad_norm=tc.max_grad_norm, optim="adamw_torch", adam_epsilon=tc.adam_eps,
            use_cpu=True, save_strategy="no", report_to=[], logging_steps=10_000, disable_tqdm=True,
            dataloader_num_workers=0, seed=tc.seed, data_seed=tc.seed)
        InOrder(model=model, args=args, train_dataset=micro, data_collator=collate).train()
    ga = tc.grad_accum
    return [sum(losses[i:i + ga]) for i in range(0, len(losses), ga)]


def compare(ref: list[float], got: list[float]) -> float:
    """Largest relative difference between two curves, step by step."""
    if len(ref) != len(got):
        raise ValueError(f"curves of {len(ref)} and {len(got)} steps")
    return max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(ref, got))


def _embedded_data() -> str:
    from slimtune.assets import data_file

    return str(data_file("alpaca_en_demo.json"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--data", default="", help="default: llamafactory's alpaca_en_demo.json (embedded)")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--ga", type=int, default=2)
    ap.add_argument("--max_len", type=int, default=256)
    ap.add_argument("--out", default=str(HERE / "results" / f"{datetime.date.today()}-cpu-loss_curve.jsonl"))
    a = ap.parse_args(argv)
    model_dir = str(models.resolve(a.model))
    data = a.data or _embedded_data()
    cfg = settings(a.bs, a.ga, a.steps, max_len=a.max_len)
    records, pad = encoded(model_dir, data, cfg, limit=a.bs * a.ga * a.steps)
    curves = {"hf-trainer+peft": hf_curve(model_dir, records, pad, cfg),
              "slimtune": slimtune_curve(model_dir, records, pad, cfg),
              "slimtune packed": slimtune_curve(model_dir, records, pad,
                                                settings(a.bs, a.ga, a.steps, max_len=a.max_len,
                                                                                 packing="rows"))}
    ref = curves["hf-trainer+peft"]
    print("step  " + "  ".join(f"{k:>16}" for k in curves))
    for i in range(len(ref)):
        print(f"{i + 1:4d}  " + "  ".join(f"{c[i]:16.6f}" for c in curves.values()))
    row = {"date": str(datetime.date.today()), "model": a.model, "data": Path(data).name, "steps": a.steps,
           "bs": a.bs, "ga": a.ga, "max_len": a.max_len, "curves": curves,
           "max_rel_diff": {k: compare(ref, c) for k, c in curves.items() if k != "hf-trainer+peft"},
           "drop": {k: c[0] - sum(c[-5:]) / 5 for k, c in curves.items()}}
    print(json.dumps(row["max_rel_diff"]))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        with open(a.out, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
