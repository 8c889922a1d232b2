"""bench/grpo_speed.py's slimtune recipe in its CPU smoke shape: the row's step split, tokens/s and token count."""
import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import grpo_speed  # noqa: E402


def test_smoke_row_splits_each_step_and_counts_every_prompt_and_completion_token(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the run folder under tmp_path
    a = argparse.Namespace(size="tiny", vocab=1024, generations=2, new_tokens=8, prompts=2, micro=0, steps=2,
                           warmup=1, key=[], budget=0)
    threads = torch.get_num_threads()
    try:
        row = grpo_speed.slimtune_worker(a)
    finally:
        torch.set_num_threads(threads)
    json.dumps(row)
    assert (row["tool"], row["steps"], row["warmup"], row["prompts"], row["generations"]) == ("slimtune", 2, 1, 2, 2)
    for step, gen, train in zip(row["step_s"], row["step_gen_s"], row["step_train_s"]):
        assert gen > 0 and train > 0 and gen + train <= step + 1e-3
    assert row["gen_s"] + row["train_s"] <= row["step_mean_s"] + 1e-3
    # no completion ends early (EOS is outside the model's vocabulary): 3 steps x 2 prompts x 2 completions x 8
    assert row["completion_length"] == 8
    lengths = [len(p) for p in grpo_speed.prompt_ids(2 * 3, 1024)]  # one pass over the 6 prompts
    assert sum(row["step_tokens"]) == 2 * sum(lengths) + 3 * 2 * 2 * 8
    for n in row["step_tokens"]:  # each step: 2 distinct prompts, each twice, + 4 completions of 8 tokens
        assert any(n == 2 * (x + y) + 32 for i, x in enumerate(lengths) for y in lengths[i + 1:])
    assert row["tokens"] == sum(row["step_tokens"][1:])
    timed = sum(row["step_s"][1:])
    assert row["tok_s"] > 0 and abs(row["tok_s"] - row["tokens"] / timed) <= 0.01 * row["tok_s"] + 0.1


def test_compare_divides_the_newest_slimtune_row_by_the_newest_trl_row_of_its_size():
    def row(tool: str, size: str, tok_s: float) -> dict:
        return dict(bench="grpo", tool=tool, size=size, tok_s=tok_s, step_median_s=2.0, gen_s=1.5, train_s=0.5,
                    peak_gib=9.0, steps=12)
    rows = [row("trl", "1b", 900), row("trl", "1b", 1000), row("slimtune", "1b", 2500), row("slimtune", "8b", 10),
            dict(bench="grpo", tool="trl", size="8b", tok_s=0.0, error="out of memory")]
    lines = grpo_speed.compare(rows)
    assert len(lines) == 1 and lines[0].startswith("1b: slimtune 2,500 tok/s")
    assert lines[0].endswith("= 2.50x over 12 and 12 timed steps")
    tok = grpo_speed.word_tokenizer(50)
    assert tok("t7 t12")["input_ids"] == [7, 12] and tok.eos_token_id == 50 and tok.pad_token_id == 0
    assert grpo_speed.sevens([], ["t7 t17 t8 t70"]) == [0.5]
