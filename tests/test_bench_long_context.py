"""bench/long_context.py without a GPU: the length slimtune's estimator predicts, the lengths tried near it, the time
guard's skipped rows and what the search and the printed table make of them."""
import argparse
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import long_context as lc  # noqa: E402
import long_predict as lp  # noqa: E402
import table  # noqa: E402
from slimtune.kernels.select import TILE_TOKENS  # noqa: E402

GIB = 2**30
# Llama-3.1-8B's shape (bench/peers/seed_recipe.py SIZES["8b"]), as unsloth_recipe.py --make saves it for this bench
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, max_position_embeddings=1 << 20)


@pytest.fixture(scope="module")
def llama_8b():
    cfg = LlamaConfig(**LLAMA_8B)
    lp.peak_bytes("qlora", 32, 16384, cfg)  # the estimator's meta model, built once
    return cfg


def test_the_prediction_is_the_longest_length_on_the_grid_whose_estimate_fits_the_cap(llama_8b):
    peak = lambda n: lp.peak_bytes("qlora", 32, n, llama_8b)  # noqa: E731
    top = 196608
    tokens, gib = lp.predict("qlora", 32, 24, 80, llama_8b, 8192, top)
    assert 100_000 < tokens < 250_000 and tokens % 1024 == 0
    assert peak(tokens) <= 24 * GIB < peak(tokens + 1024) and gib == round(peak(tokens) / GIB, 2)
    assert all(peak(n) > 24 * GIB for n in range(tokens + 8192, top + 1, 8192))
    # the estimate drops where the tiled MLP turns on (past select.TILE_TOKENS), so the scan checks every length
    assert peak(TILE_TOKENS + 1024) < peak(TILE_TOKENS) and tokens > TILE_TOKENS


def test_the_prediction_also_fits_the_offloaded_inputs_in_cpu_memory(llama_8b):
    """On the whole GPU the estimate alone named ~550-640k tokens, whose offloaded layer inputs (134-156 GiB)
    pass a 128 GiB host; with host_gib the longest is also bounded by it, less the margin."""
    top = 1 << 20
    free, _ = lp.predict("qlora", 32, 0, 80, llama_8b, 65536, top)
    bound, _ = lp.predict("qlora", 32, 0, 80, llama_8b, 65536, top, host_gib=100)
    assert lp.offloaded_gib(free, llama_8b) > 90 >= lp.offloaded_gib(bound, llama_8b)
    assert lp.offloaded_gib(bound + 1024, llama_8b) > 90 and bound < free


def test_the_grid_search_takes_the_longest_fit_past_a_gap_and_the_cap_is_what_the_allocator_may_reserve():
    fits = lambda n: n <= 40000 or 70000 <= n <= 100000  # noqa: E731
    assert lp.longest(fits, 8192, 200000) == 99328  # 98,304 on the 8,192 grid, then 1,024 at a time
    assert lp.longest(fits, 8192, 90000) == 90112 - 8192 + 1024 * 7  # 89,088: the fine steps stop at top
    assert lp.longest(lambda n: False, 8192, 200000) == 0
    assert lp.budget_bytes(24, 79.6) == 24 * GIB
    assert lp.budget_bytes(0, 80) == lp.budget_bytes(96, 80) == 79.5 * GIB  # the whole GPU less the CUDA context


def test_the_lengths_tried_near_a_prediction():
    assert lp.near(135168, 8192) == [16384, 126976, 135168, 143360]
    assert lp.near(20480, 8192) == [16384, 20480, 28672]  # 12,288 is below 16k: not tried
    assert lp.near(135168, 5000) == [16384, 130048, 135168, 139264]  # on the 1,024 grid
    assert lp.near(16384, 8192) == [16384, 24576]


def _steps(monkeypatch, capsys, lengths: list[int], seconds, max_step_s: float = 240, fail_at: int = 0) -> list:
    """lc._steps with a fake step taking seconds(n) on a fake clock; its RESULT rows."""
    clock = [0.0]

    def step(n: int) -> None:
        if fail_at and n >= fail_at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        clock[0] += seconds(n)

    monkeypatch.setattr(lc, "DEV", "cpu")
    monkeypatch.setattr(lc, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    a = argparse.Namespace(lengths=lengths, tps_at=16384, timed=2, max_step_s=max_step_s)
    lc._steps(a, step, float("inf"))
    return [json.loads(line[7:]) for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT ")]


def test_a_length_projected_past_max_step_s_is_skipped_after_the_longest_projected_to_fit(monkeypatch, capsys):
    quadratic = lambda n: 4.0 * (n / 16384) ** 2  # noqa: E731
    rows = _steps(monkeypatch, capsys, [16384, 126976, 135168, 143360], quadratic)
    # 126,976 at 4 s x (126976 / 16384)^2 = 240.25 s: over 240; 16384 x sqrt(240 / 4) on the grid is tried instead
    assert [(r["tokens"], r["ok"]) for r in rows] == [(16384, True), (125952, True), (126976, False)]
    assert rows[0]["step_s"] == 4.0 and rows[0]["tok_s"] == 4096 and rows[1]["first_step_s"] == 236.39
    assert rows[2] == {"tokens": 126976, "ok": False, "skipped": "time", "projected_s": 240.2, "limit_s": 240}
    rows = _steps(monkeypatch, capsys, [16384, 32768, 65536], quadratic, max_step_s=20)  # 32,768 projected 16 s
    assert [(r["tokens"], r.get("skipped")) for r in rows] == [(16384, None), (32768, None), (65536, "time")]
    assert lp.stretch(4.0, 16384, -5.0) == 0  # no time left: nothing is stretched to
    rows = _steps(monkeypatch, capsys, [16384, 32768, 65536], quadratic, fail_at=32768)
    assert [(r["tokens"], r["ok"], r.get("oom")) for r in rows] == [(16384, True, None), (32768, False, True)]


def _canned(monkeypatch, answer) -> list:
    """lc._spawn replaced: each length's row from answer(n) until the first that is not ok; the lengths asked."""
    asked = []

    def spawn(a, tool, method, cap, lengths, timeout, log):
        asked.append(list(lengths))
        rows = []
        for n in lengths:
            rows.append(dict(tokens=n, **answer(n)))
            if not rows[-1]["ok"]:
                break
        return rows, {}

    monkeypatch.setattr(lc, "_spawn", spawn)
    return asked


def _a(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{**dict(quick=False, resolution=8192, max_doublings=6, tps_at=16384, max_step_s=240,
                                        one_record="varlen", from_tokens=16384),
                                 **kw})


def test_search_counts_a_length_skipped_for_time_as_no_failure(monkeypatch):
    asked = _canned(monkeypatch, lambda n: dict(ok=True, first_step_s=9.0, step_s=3.0, tok_s=5461)
                    if n < 135168 else dict(ok=False, skipped="time", projected_s=300.0))
    cell = lc.search(_a(), "slimtune", "qlora", 24, lc.time.perf_counter() + 500, print, predicted=135168)
    assert asked == [[16384, 126976, 135168, 143360]]  # no bisection: the skip is not a failure
    assert cell["longest_tokens"] == 126976 and cell["shortest_failed"] is None and cell["bounded_by_time"]
    assert cell["tok_s_at_16k"] == 5461
    assert "| slimtune | qlora | 24 | >= 126976 (time) | None |" in lc.table([dict(tool="slimtune", method="qlora",
                                                                                   cap_gib=24, **cell)])


def test_search_bisects_below_the_lowest_length_near_the_prediction_when_it_fails(monkeypatch):
    asked = _canned(monkeypatch, lambda n: dict(ok=True, first_step_s=3.0 * (n / 16384) ** 2) if n <= 100000
                    else dict(ok=False, oom=True, error="OutOfMemoryError"))
    cell = lc.search(_a(), "slimtune", "qlora", 24, lc.time.perf_counter() + 500, print, predicted=135168)
    assert asked == [[16384, 126976, 135168, 143360], [71680], [99328], [112640], [105472]]
    assert (cell["longest_tokens"], cell["shortest_failed"], cell["bounded_by_time"]) == (99328, 105472, False)
    # the same with a step limit the bisection's next length would pass: it stops there, a lower bound
    asked = _canned(monkeypatch, lambda n: dict(ok=True, first_step_s=3.0 * (n / 16384) ** 2) if n <= 100000
                    else dict(ok=False, oom=True, error="OutOfMemoryError"))
    cell = lc.search(_a(max_step_s=100), "slimtune", "qlora", 24, lc.time.perf_counter() + 500, print, 135168)
    assert asked == [[16384, 126976, 135168, 143360], [71680]] and cell["tried"][-1]["skipped"] == "time"
    assert (cell["longest_tokens"], cell["shortest_failed"], cell["bounded_by_time"]) == (71680, 126976, True)


def test_one_long_length_in_a_call_of_its_own_is_a_lower_bound_when_it_trains(monkeypatch):
    asked = _canned(monkeypatch, lambda n: dict(ok=True, first_step_s=230.0))
    cell = lc.search(_a(from_tokens=262144, max_doublings=1, max_step_s=480, resolution=262144), "slimtune", "lora",
                     0, lc.time.perf_counter() + 540, print)
    assert asked == [[262144]]  # that length alone: no 16k first, no bisection
    assert (cell["longest_tokens"], cell["shortest_failed"], table.lower_bound(cell)) == (262144, None, True)
    assert cell["tok_s_at_16k"] is None and not cell["bounded_by_time"]
    row = dict(tool="slimtune", method="lora", cap_gib=79.2, **cell)
    assert "| >= 262144 (every length tried trained) | None |" in lc.table([row])
    assert "| >= 262,144 |" in "\n".join(table.long_context_section([("x.jsonl", dict(row, bench="long_context"))]))
    asked = _canned(monkeypatch, lambda n: dict(ok=False, oom=True, error="OutOfMemoryError"))
    cell = lc.search(_a(from_tokens=262144, max_doublings=1, resolution=262144), "slimtune", "lora", 0,
                     lc.time.perf_counter() + 540, print)
    assert (cell["longest_tokens"], cell["shortest_failed"], table.lower_bound(cell)) == (0, 262144, False)


def test_a_trial_that_runs_out_of_time_ends_in_a_skipped_row(monkeypatch):
    out = 'LOADED {"kernels": {}}\nRESULT {"tokens": 16384, "ok": true, "first_step_s": 3.0}\n'

    def run(cmd, **kw):
        assert cmd[cmd.index("--max-step-s") + 1] == "240" and float(cmd[cmd.index("--time-left") + 1]) == 300
        raise subprocess.TimeoutExpired(cmd, 300, output=out.encode(), stderr=b"")

    monkeypatch.setattr(lc.subprocess, "run", run)
    rows, info = lc._spawn(_a(model_dir="m", r=32, timed=2), "unsloth", "lora", 0, [16384, 32768, 65536], 300,
                           lambda text: None)
    assert rows[-1] == {"tokens": 32768, "ok": False, "skipped": "deadline"} and info == {"kernels": {}}


def test_the_table_marks_lower_bounds_and_predictions():
    rows = [dict(tool="slimtune", method="lora", cap_gib=79.6, longest_tokens=262144, shortest_failed=None,
                 bounded_by_time=True, predicted_tokens=505856, predicted_gib=79.05, tok_s_at_16k=7000),
            dict(tool="unsloth", method="lora", cap_gib=24, not_run="--budget-s spent")]
    text = lc.table(rows)
    assert "| slimtune | lora | 79.6 | >= 262144 (time) | None | 505856 (79.05) | 7000 |" in text
    assert "| unsloth | lora | 24 | --budget-s spent | None |  | None |" in text


def test_predict_only_runs_without_a_gpu_from_the_model_folders_config(tmp_path, capsys, monkeypatch):
    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=65536).save_pretrained(tmp_path)
    monkeypatch.setattr(lc.subprocess, "run", lambda *a, **k: pytest.fail("nothing is spawned or made"))
    assert lc.main(["--predict-only", "--gpu-gib", "1", "--caps", "0.3", "--tools", "slimtune,unsloth", "--methods",
                    "lora", "--model-dir", str(tmp_path), "--out", str(tmp_path / "no.jsonl")]) == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    mcfg = lp.model_config(str(tmp_path), "8b")
    want = lp.longest(lambda n: lp.peak_bytes("lora", 32, n, mcfg) <= 0.3 * GIB, 8192, 65536)
    assert 16384 < want < 65536 and row["predicted_tokens"] == want and row["device"] == "cpu"
    assert row["lengths"] == lp.near(want, 8192) and not (tmp_path / "no.jsonl").exists()
    assert row["predicted_offload_gib"] == round(want * 2 * 64 * 2 / GIB, 1)  # tokens x layers x hidden x bf16
