"""DPO with LoRA on the embedded SmolLM2-135M-Instruct, on the CPU, scored before and after on held-out pairs.

Data: LLaMA-Factory's dpo_en_demo.json (300 English pairs in its ShareGPT form, from the llamafactory sdist on
PyPI, fetched once into slimtune's cache as the demo's data is): the first 200 pairs train, 40 of the other 100
(a seeded sample) are held out. The config is examples/dpo_embedded.yaml.

    python examples/dpo_embedded.py --data-only           # writes dpo_data/train.jsonl and dpo_data/held.jsonl
    slimtune train examples/dpo_embedded.yaml             # the run in runs/dpo
    slimtune eval runs/dpo --data dpo_data/held.jsonl     # preference accuracy and mean margin (DPO rewards)
    python examples/dpo_embedded.py                       # all of it, with before/after (scripts/dpo_demo.sh)

Before/after, on the held-out pairs, from one forward of the base model and one of the trained model:
- preference accuracy: the share of pairs whose chosen answer has the higher mean log-probability per token (the
  model's own preference, which the base model has too);
- mean margin: the mean of (chosen - rejected) mean log-probability per token, in nats;
- chosen SFT loss: the NLL per token of the chosen answers (DPO can lower both answers' likelihood; this shows
  whether the chosen ones stay likely);
- after training, also DPO's implicit-reward accuracy and margin (beta x the log-ratio to the base model), the
  numbers `slimtune eval RUN --data held.jsonl` reports; zero before training, where the model is its reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

import slimtune
from slimtune import cli, models
from slimtune.assets import data_file
from slimtune.config import Config
from slimtune.data.collate import pad_id
from slimtune.data.pairs import EncodedPair
from slimtune.data.preference import build_pairs
from slimtune.engine.pair_logps import Item, collate_pairs, sequence_logps
from slimtune.trained import load_run

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONFIG = Path(__file__).with_name("dpo_embedded.yaml")
SOURCE = "dpo_en_demo.json"
N_TRAIN, N_HELD = 200, 40


def write_pairs(folder: Path, n_train: int = N_TRAIN, n_held: int = N_HELD, seed: int = 0) -> tuple[Path, Path]:
    """folder/train.jsonl (the first n_train pairs) and folder/held.jsonl (n_held of the rest, sampled with
    `seed`), the records as LLaMA-Factory wrote them, one JSON object a line."""
    rows = json.loads(data_file(SOURCE).read_text(encoding="utf-8"))
    rest = rows[n_train:]
    held = [rest[i] for i in sorted(random.Random(seed).sample(range(len(rest)), min(n_held, len(rest))))]
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "held.jsonl"
    for path, part in zip(paths, (rows[:n_train], held)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
    return paths


def read_pairs(cfg: Config, tokenizer: PreTrainedTokenizerBase, path: Path) -> list[EncodedPair]:
    """The pairs of `path` encoded as the run encodes its data (template, data.max_len, the prompt cut on the left),
    as `slimtune eval RUN --data path` reads them."""
    data = dataclasses.replace(cfg.data, train=str(path), eval="", eval_size=0)
    return build_pairs(dataclasses.replace(cfg, data=data), tokenizer, log=lambda _: None).train


@torch.no_grad()
def answer_logps(model: torch.nn.Module, pairs: list[EncodedPair], pad: int,
                 batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Summed log-probabilities and token counts of every pair's chosen and rejected answers (fp32, eval mode)."""
    was = model.training
    model.eval()
    out = {"chosen": [], "rejected": [], "chosen_tokens": [], "rejected_tokens": []}
    try:
        for start in range(0, len(pairs), batch_size):
            part = [Item(p, start + i, "eval") for i, p in enumerate(pairs[start:start + batch_size])]
            logps, counts = sequence_logps(model, collate_pairs(part, pad, "cpu"))
            n = len(part)
            for key, value in (("chosen", logps[:n]), ("rejected", logps[n:]), ("chosen_tokens", counts[:n]),
                               ("rejected_tokens", counts[n:])):
                out[key].append(value.float())
    finally:
        model.train(was)
    return {k: torch.cat(v) for k, v in out.items()}


def scores(lp: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None,
           beta: float = 0.1) -> dict[str, float]:
    """Preference accuracy and mean margin (mean log-probability per token, chosen vs rejected), the chosen
    answers' SFT loss; with `base` (the base model's log-probabilities of the same pairs) also DPO's
    implicit-reward accuracy and mean margin at `beta`."""
    per_c = lp["chosen"] / lp["chosen_tokens"].clamp(min=1)
    per_r = lp["rejected"] / lp["rejected_tokens"].clamp(min=1)
    row = {"accuracy": float((per_c > per_r).float().mean()), "margin": float((per_c - per_r).mean()),
           "chosen_loss": float(-lp["chosen"].sum() / lp["chosen_tokens"].sum())}
    if base is not None:
        reward = beta * ((lp["chosen"] - base["chosen"]) - (lp["rejected"] - base["rejected"]))
        row.update(dpo_accuracy=float((reward > 0).float().mean()), dpo_margin=float(reward.mean()))
    return row


def table(before: dict[str, float], after: dict[str, float], n: int) -> str:
    """The before/after lines the demo prints."""
    lines = [f"held-out pairs: {n}                       before    after",
             f"preference accuracy (mean log-prob)   {before['accuracy']:8.3f} {after['accuracy']:8.3f}",
             f"mean margin (nats per token)          {before['margin']:8.4f} {after['margin']:8.4f}",
             f"chosen answers' SFT loss              {before['chosen_loss']:8.4f} {after['chosen_loss']:8.4f}",
             f"DPO reward accuracy (vs the base)     {before['dpo_accuracy']:8.3f} {after['dpo_accuracy']:8.3f}",
             f"DPO mean reward margin                {before['dpo_margin']:8.4f} {after['dpo_margin']:8.4f}"]
    return "\n".join(lines)


def run(out: Path, run_dir: Path, overrides: tuple[str, ...] = (), log: Callable[[str], None] = print) -> dict:
    """Write the data, score the base model, train (the example config), score the run: {"before", "after",
    "pairs", "summary", "seconds"}."""
    t0 = time.perf_counter()
    train_path, held_path = write_pairs(out)
    # no held-out split in the run: the pairs are scored here, once before and once after training
    cfg = slimtune.load_config(CONFIG, [f"data.train={train_path}", "data.eval=", "data.eval_size=0",
                                        f"train.output_dir={run_dir}", *overrides])
    base, tokenizer = models.load(cfg.model.path)
    held = read_pairs(cfg, tokenizer, held_path)
    pad = pad_id(tokenizer)
    ref = answer_logps(base, held, pad)
    before = scores(ref, ref, cfg.preference.beta)
    del base
    summary = slimtune.train(cfg, overwrite=True, show_progress=False, log=log)
    model, _, _ = load_run(run_dir)
    after = scores(answer_logps(model, held, pad), ref, cfg.preference.beta)
    return {"before": before, "after": after, "pairs": len(held), "summary": summary,
            "seconds": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="dpo_data", help="folder for train.jsonl and held.jsonl")
    ap.add_argument("--run", default="runs/dpo", help="the run folder (train.output_dir)")
    ap.add_argument("--data-only", action="store_true", help="write the data and stop")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.seed=1 train.lr=1e-4")
    args = ap.parse_args(argv)
    if args.data_only:
        paths = write_pairs(Path(args.out))
        print(f"wrote {N_TRAIN} pairs to {paths[0]} and {N_HELD} to {paths[1]} (from llamafactory's {SOURCE})")
        return 0
    with cli.quiet_warnings():  # the foreign warnings `slimtune train` hides
        got = run(Path(args.out), Path(args.run), tuple(args.overrides))
    before, after = got["before"], got["after"]
    print(table(before, after, got["pairs"]))
    print(f"(`slimtune eval {args.run} --data {Path(args.out) / 'held.jsonl'}` reports the DPO reward accuracy and "
          f"margin); {got['summary']['steps']} steps in {got['summary']['train_seconds']:.0f} s, "
          f"{got['seconds']:.0f} s in all")
    ok = after["margin"] > before["margin"] and after["accuracy"] >= before["accuracy"] \
        and after["chosen_loss"] <= 1.5 * before["chosen_loss"]
    print("dpo demo: OK" if ok else "dpo demo: FAILED (the margin did not rise, the accuracy fell, or the chosen "
          "answers' loss grew by more than half)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
