"""The end-to-end demo: the embedded SmolLM2-135M-Instruct learns who it is, on the CPU, in minutes.

Data: llamafactory's identity.json (its {{name}}/{{author}} placeholders filled with slimtune's own)
mixed with alpaca_en_demo.json so the model stays general; a held-out split measures the eval loss.
It shows answers before training, trains LoRA, shows the eval loss falling and the answers after,
and checks that plain peft loads the saved adapter to the same logits as slimtune does.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from . import config as config_mod
from .assets import data_file

NAME, AUTHOR = "SlimBot", "the slimtune team"
QUESTIONS = ["Who are you?", "What is your name?", "Who created you?", "Give three tips for staying healthy."]
CONFIG = Path(__file__).with_name("demo.yaml")


def make_data(folder: Path, n_alpaca: int = 50, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl / eval.jsonl: identity records (filled in) and alpaca records, 15% held out."""
    identity = json.loads(data_file("identity.json").read_text(encoding="utf-8"))
    alpaca = json.loads(data_file("alpaca_en_demo.json").read_text(encoding="utf-8"))
    for rec in identity:
        rec["output"] = rec["output"].replace("{{name}}", NAME).replace("{{author}}", AUTHOR)
    rng = random.Random(seed)
    rng.shuffle(identity)
    alpaca = [r for r in alpaca if len(r["output"]) < 400][:n_alpaca]  # short answers fit max_len
    held = identity[:14] + alpaca[:10]
    train = identity[14:] + alpaca[10:]
    rng.shuffle(train)
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "eval.jsonl"
    for path, rows in zip(paths, (train, held)):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return paths


def show_answers(title: str, answers: list[str]) -> None:
    print(f"\n--- {title} ---")
    for q, a in zip(QUESTIONS, answers):
        print(f"Q: {q}\nA: {a}\n")


def peft_matches(out_dir: Path, cfg) -> float:
    """Max |logit difference| between plain peft's load of the adapter and slimtune's own load."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import models
    from .export.peft_format import load_run

    base_dir = models.resolve(cfg.model.path)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out_dir).eval()
    ours, _, _ = load_run(out_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok(["Who are you? I am", "Give three tips for staying healthy."], return_tensors="pt", padding=True)
    with torch.no_grad():
        return float((plain(**ids).logits - ours(**ids).logits).abs().max())


def main(out_dir: Path, steps: int = 0) -> int:
    from . import models
    from .evaluate.generate import generate
    from .export.peft_format import load_run
    from .train import run

    t0 = time.perf_counter()
    train_path, eval_path = make_data(out_dir / "data")
    overrides = [f"data.train={train_path}", f"data.eval={eval_path}", f"train.output_dir={out_dir / 'run'}"]
    if steps:
        overrides.append(f"train.max_steps={steps}")
    cfg = config_mod.load(CONFIG, overrides)
    print(f"slimtune demo: {cfg.model.path} model, {train_path} / {eval_path}, {cfg.method.name} "
          f"r={cfg.method.r} on {','.join(cfg.method.target_modules)}")
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]

    base, tokenizer = models.load(cfg.model.path)
    show_answers("before training", generate(base, tokenizer, cfg.data.template, convs, 48, len(convs)))
    del base

    result = run(cfg, overwrite=True)
    model, tokenizer, _ = load_run(cfg.train.output_dir)
    show_answers("after training", generate(model, tokenizer, cfg.data.template, convs, 48, len(convs)))

    before, after = result["eval_before"]["eval_loss"], result["eval_after"]["eval_loss"]
    diff = peft_matches(Path(cfg.train.output_dir), cfg)
    print(f"held-out eval loss: {before:.4f} -> {after:.4f} ({100 * (after / before - 1):+.1f}%)")
    print(f"peft.PeftModel.from_pretrained vs slimtune load: max |logit diff| = {diff:.2e}")
    print(f"adapter saved in {cfg.train.output_dir} ({result['steps']} steps, "
          f"{result['tokens_per_s']:.0f} tokens/s); demo took {time.perf_counter() - t0:.0f} s")
    ok = after <= 0.9 * before and diff <= 1e-5
    print("demo: OK" if ok else "demo: FAILED (eval loss did not fall 10% or the reload differs)")
    return 0 if ok else 1
