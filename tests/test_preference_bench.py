"""bench/preference_speed.py: its token counts, and the slimtune recipe of its --smoke mode on the CPU."""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from slimtune import cli
from slimtune.engine import preflight

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import preference_speed as bench  # noqa: E402


def test_token_counts_by_hand():
    pairs = [([1, 2, 3], [4, 5], [6]), ([7], [8], [9, 10, 11])]
    # prompt + chosen + EOS and prompt + rejected + EOS: (3 + 2 + 1) + (3 + 1 + 1) and (1 + 1 + 1) + (1 + 3 + 1)
    assert bench.real_tokens(pairs) == 11 + 8
    # two rows a pair, each as wide as the batch's widest row (3 + 2 + 1 = 6; the second pair's 1 + 3 + 1 = 5)
    assert bench.padded_tokens(pairs, 2) == 4 * 6
    assert bench.padded_tokens(pairs, 1) == 2 * 6 + 2 * 5


def test_synthetic_pairs_fit_max_len_and_repeat():
    pairs = bench.synthetic_pairs(200, 256, 512)
    assert pairs == bench.synthetic_pairs(200, 256, 512)
    assert all(len(p) + max(len(c), len(r)) + 1 <= 256 and c and r for p, c, r in pairs)
    assert all(10 <= t < 512 for p, c, r in pairs for t in p + c + r)
    assert min(len(p) for p, _, _ in bench.synthetic_pairs(200, 1024)) >= 15


def test_slimtune_smoke_row_counts_every_real_token(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("slimtune.evaluate.summary.loss_png", lambda *a, **k: None)  # matplotlib: seconds, not read
    seen, real = [], preflight.predict
    monkeypatch.setattr(preflight, "predict", lambda *a: seen.append(real(*a)) or seen[-1])
    folder = tmp_path / "model"
    bench.make("tiny", folder, 2, 64)  # 1 warm-up step and 1 timed step of 1 pair
    with (folder / "pairs.jsonl").open() as fh:
        assert [len(json.loads(line)["prompt"].split()) for line in fh] == \
            [len(p) for p, _, _ in bench.synthetic_pairs(2, 64, bench.SMOKE_SHAPE["vocab_size"])]
    flags = ["--smoke", "--steps", "1", "--pairs", "1", "--max_len", "64", "--folder", str(folder)]
    assert bench.main(["--worker", "slimtune", *flags]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT "))
    row = json.loads(line[len("RESULT "):])
    pairs = bench.synthetic_pairs(2, 64, bench.SMOKE_SHAPE["vocab_size"])
    assert row["tool"] == "slimtune" and row["size"] == "tiny" and row["steps"] == 1 and row["tok_s"] > 0
    assert row["tokens_all_steps"] == bench.real_tokens(pairs)  # slimtune's count over both steps, by our formula
    assert row["real_tokens"] == row["stream_real_tokens"]  # metrics.jsonl's count and the stream's
    assert row["real_tokens"] in (bench.real_tokens(pairs[:1]), bench.real_tokens(pairs[1:]))  # the timed step's pair
    assert row["padded_tokens"] >= row["real_tokens"] and isinstance(row["predicted_gib"], float)
    # `slimtune estimate` of the recipe's config (on the CPU, as the smoke ran) predicts what the bench and train did
    a = argparse.Namespace(max_len=64, pairs=1, steps=1, warmup=1)
    assert cli.main(["estimate", *bench.slimtune_overrides(a, folder, tmp_path / "run"), "train.device=cpu"]) == 0
    assert row["plan"] in capsys.readouterr().out
    bench_est, _, train_est, estimate_est = seen
    assert bench_est.peak == train_est.peak == estimate_est.peak > 0


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl is not installed here (the GPU machine gets "
                    "it from the carried wheels: bench/gpu.sh)")
def test_trl_smoke_row_counts_the_same_tokens(tmp_path, capsys):
    folder = tmp_path / "model"
    bench.make("tiny", folder, 2, 64)
    assert bench.main(["--worker", "trl", "--smoke", "--steps", "1", "--pairs", "1", "--max_len", "64",
                       "--folder", str(folder)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("RESULT "))
    row = json.loads(line[len("RESULT "):])
    assert row["tool"] == "trl" and row["tok_s"] > 0
    assert row["tokens_all_steps"] == bench.real_tokens(bench.synthetic_pairs(2, 64, bench.SMOKE_SHAPE["vocab_size"]))
