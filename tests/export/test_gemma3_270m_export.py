"""Opt-in, on Gemma 3 270M (scripts/get_gemma3.sh; skipped when absent): a short LoRA run on its GGUF base with the
gemma3 template lowers the held-out loss; `slimtune export RUN` to f16, and the file read back as `slimtune chat`
reads it: the adapter's logits within 1e-2, the same greedy answer, the same token ids and chat template.
Measured when written: held-out loss 7.233 -> 2.999 in 4 steps, relative logit error 2.0e-3."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from slimtune import cli

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
GGUF = Path(os.environ.get("SLIMTUNE_GEMMA3_GGUF") or CACHE / "slimtune/gemma3-270m/gemma-3-270m-q4_k_m.gguf")
pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason=f"opt-in: {GGUF} not found (bash scripts/get_gemma3.sh, "
                                                           "or set SLIMTUNE_GEMMA3_GGUF)")
PROMPTS = ["Who are you?", "Name a primary color.", "What do bees make?"]


def test_a_lora_run_exports_and_reads_back_with_the_adapters_logits(tmp_path, capsys):
    from slimtune import models
    from slimtune.data.templates import render
    from slimtune.evaluate.generate import Sampling, answer_all
    from slimtune.trained import load_run

    from slimtune.runs.metrics_log import read_metrics

    rows = [{"instruction": q, "output": f"I am Gemmy, the small helper. Answer {i}."}
            for i, q in enumerate(PROMPTS * 5)]
    run = tmp_path / "run"
    train, held = write_jsonl(tmp_path / "train.jsonl", rows[:12]), write_jsonl(tmp_path / "held.jsonl", rows[12:])
    assert cli.main(["train", f"model.path={GGUF}", "data.template=gemma3", f"data.train={train}", f"data.eval={held}",
                     "data.max_len=48", "method.r=8", "method.target_modules=q_proj,v_proj", "train.lr=3e-3",
                     "train.max_steps=4", "train.batch_size=4", f"train.output_dir={run}", "--no-progress"]) == 0
    evals = [r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
    assert len(evals) >= 2 and evals[-1] < 0.9 * evals[0]
    path = tmp_path / "gemma3.gguf"
    assert cli.main(["export", str(run), "--output", str(path), "--quant", "f16"]) == 0
    capsys.readouterr()
    adapter, tok, _ = load_run(run)
    back, back_tok = models.load_gguf(path)  # as `slimtune chat model.gguf` loads it
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = adapter(**enc).logits
        err = float((back.eval()(**enc).logits - want).norm() / want.norm())
    with capsys.disabled():
        print(f"\nGemma 3 270M, 4 LoRA steps: held-out loss {evals[0]:.3f} -> {evals[-1]:.3f}; f16 GGUF read back: "
              f"relative logit error {err:.2e}")
    assert err <= 1e-2
    for text in PROMPTS + ["<start_of_turn>user\nhi<end_of_turn>\n", "Ünïcödé  spaces\tand\nlines 12345"]:
        assert back_tok(text)["input_ids"] == tok(text)["input_ids"], text
    conv = [[{"role": "user", "content": PROMPTS[0]}]]
    assert back_tok.apply_chat_template(conv[0], tokenize=False, add_generation_prompt=True) == \
        render("gemma3", conv[0], tok, add_generation_prompt=True).text
    ours = answer_all(adapter, tok, "gemma3", conv, Sampling(max_new_tokens=16), batch_size=1)
    theirs = answer_all(back, back_tok, "gemma3", conv, Sampling(max_new_tokens=16), batch_size=1)
    assert theirs.texts == ours.texts, (ours.texts, theirs.texts)
