"""The end-to-end demo: the embedded SmolLM2-135M-Instruct learns who it is, on the CPU, in minutes.

Data: llamafactory's identity.json (its {{name}}/{{author}} placeholders filled with slimtune's own)
mixed with alpaca_en_demo.json so the model stays general; a held-out split measures the eval loss.
It shows answers and the held-out loss (through `slimtune eval`'s function) before training, trains
LoRA, shows both after training, and checks that plain peft loads the saved adapter to the same
logits as slimtune does.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from . import config as config_mod
from . import models, train
from .api import load
from .assets import data_file
from .data import read
from .evaluate.generate import generate
from .evaluate.report import evaluate_run
from .trained import load_run

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


def peft_matches(out_dir: Path, cfg: config_mod.Config) -> float:
    """Max |logit difference| between plain peft's load of the adapter and slimtune's own load."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_dir = models.resolve(cfg.model.path)
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out_dir).eval()
    ours, _, _ = load_run(out_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    ids = tok(["Who are you? I am", "Give three tips for staying healthy."], return_tensors="pt", padding=True)
    with torch.no_grad():
        return float((plain(**ids).logits - ours(**ids).logits).abs().max())


def main(out_dir: Path, steps: int = 0) -> int:
    t0 = time.perf_counter()
    train_path, eval_path = make_data(out_dir / "data")
    # the held-out loss before and after is measured by `slimtune eval`'s own function, on the models
    # already loaded for the answers; training holds nothing out (data.eval_size=0) so it does not
    # measure the same loss again: a pass over the 24 held-out records took 25 s on 2 busy CPU cores
    overrides = [f"data.train={train_path}", "data.eval_size=0", f"train.output_dir={out_dir / 'run'}"]
    if steps:
        overrides.append(f"train.max_steps={steps}")
    cfg = config_mod.load(CONFIG, overrides)
    print(f"slimtune demo: {cfg.model.path} model, {train_path} / {eval_path}, {cfg.method.name} "
          f"r={cfg.method.r} on {','.join(cfg.method.target_modules)}")
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]

    held = read(eval_path)
    base, tokenizer = models.load(cfg.model.path)
    show_answers("before training", generate(base, tokenizer, cfg.data.template, convs, 48, len(convs)))
    t_eval = time.perf_counter()
    before = evaluate_run(base, tokenizer, cfg, held).scores
    eval_seconds = time.perf_counter() - t_eval
    print(f"eval before training (as `slimtune eval --base {cfg.model.path} --max-len {cfg.data.max_len} --data "
          f"{eval_path}`): loss {before['eval_loss']:.4f}, perplexity {before['eval_ppl']:.2f}")
    del base

    result = train(cfg, overwrite=True)  # the public API, as a user's script would
    model = load(cfg.train.output_dir)  # the base from the run's config.yaml; the tokenizer is the base's
    show_answers("after training", generate(model, tokenizer, cfg.data.template, convs, 48, len(convs)))
    t_eval = time.perf_counter()
    after = evaluate_run(model, tokenizer, cfg, held).scores
    eval_seconds += time.perf_counter() - t_eval
    print(f"eval after training (as `slimtune eval {cfg.train.output_dir} --data {eval_path}`): "
          f"loss {after['eval_loss']:.4f}, perplexity {after['eval_ppl']:.2f}")

    diff = peft_matches(Path(cfg.train.output_dir), cfg)
    before, after = before["eval_loss"], after["eval_loss"]
    print(f"held-out eval loss ({len(held)} records): {before:.4f} -> {after:.4f} ({100 * (after / before - 1):+.1f}%)")
    print(f"peft.PeftModel.from_pretrained vs slimtune load: max |logit diff| = {diff:.2e}")
    total = time.perf_counter() - t0
    print(f"adapter saved in {cfg.train.output_dir} ({result['steps']} steps in {result['train_seconds']:.0f} s, "
          f"{result['input_tokens_per_s']:.0f} input tokens/s); evaluation took {eval_seconds:.0f} s "
          f"({100 * eval_seconds / total:.0f}%) of the demo's {total:.0f} s")
    ok = after <= 0.9 * before and diff <= 1e-5
    print("demo: OK" if ok else "demo: FAILED (eval loss did not fall 10% or the reload differs)")
    return 0 if ok else 1
