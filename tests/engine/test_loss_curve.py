"""Issue 8's curve check at test scale: slimtune's loop (padded and in packed rows) and recipe (1), the
transformers Trainer + peft, on the same records in the same micro-batches from the same LoRA init, give the
same loss at each of 50 optimizer steps (fp32, CPU). bench/loss_curve.py runs it on the embedded model."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import WORDS, load_script, write_jsonl

BENCH = Path(__file__).resolve().parents[2] / "bench" / "loss_curve.py"


@pytest.fixture(scope="module")
def curve():
    return load_script(BENCH)


def test_fifty_steps_match_the_trainer(curve, tiny_model_dir, tmp_path):
    rows = [{"instruction": f"Say something about {w} ({i}).", "input": "x" * (i % 5),
             "output": f"Here is {w}. " * (1 + i % 4)} for w in WORDS for i in range(5)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)  # 40 records of differing lengths: padding matters
    cfg = curve.settings(bs=3, ga=2, steps=50, lr=5e-3, r=4, max_len=64)
    records, pad = curve.encoded(str(tiny_model_dir), str(data), cfg)
    ref = curve.hf_curve(str(tiny_model_dir), records, pad, cfg)
    ours = curve.slimtune_curve(str(tiny_model_dir), records, pad, cfg)
    packed = curve.slimtune_curve(str(tiny_model_dir), records, pad,
                                  curve.settings(bs=3, ga=2, steps=50, lr=5e-3, r=4, max_len=64, packing="rows"))
    assert len(ref) == len(ours) == len(packed) == 50
    assert ref[-1] < 0.7 * ref[0]  # it learns: a curve worth comparing
    assert curve.compare(ref, ours) < 1e-5  # measured 2e-7
    assert curve.compare(ref, packed) < 1e-5
