"""Per-step times in metrics.jsonl and the run's summary, the stall check, and train.profile_step
(engine/timing.py). No test here asserts a speed: a planted stall is what must be found."""
from __future__ import annotations

import gc
import json
import statistics
import time

import pytest
import torch

from conftest import lora_run_config
from slimtune import cli
from slimtune.engine import timing
from slimtune.runs.metrics_log import read_metrics

STEPS = 8


def test_stalls_are_steps_over_twice_the_median_after_the_first():
    times = {1: 9.0, 2: 0.5, 3: 7.2, 4: 0.55, 5: 0.6, 6: 0.5, 7: 1.05, 8: 0.52}
    # the first step (kernels built, compile) is never one; the median of steps 2..8 is 0.55
    assert timing.stalls(times) == [(3, 7.2)]
    assert timing.stalls({s: 0.5 for s in range(1, 200)}) == []
    assert timing.stalls({1: 1.0, 2: 5.0}) == []  # too few steps to tell
    # per token: step 3 had three times the tokens of the others, so its 1.5 s is no stall; step 5's 1.2 s is
    tokens = {1: 100, 2: 100, 3: 300, 4: 100, 5: 100, 6: 100}
    assert timing.stalls({1: 3.0, 2: 0.5, 3: 1.5, 4: 0.5, 5: 1.2, 6: 0.5}, tokens=tokens) == [(5, 1.2)]


def _train(tmp, model_dir, name, **train):
    cfg = lora_run_config(tmp, model_dir, name, max_steps=STEPS, micro_batch_size=2, grad_accum=2, **train)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp / name
    return run, [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r], \
        json.loads((run / "summary.json").read_text())


def test_every_step_has_its_seconds_and_the_summary_its_median_and_slowest(tmp_path, tiny_model_dir):
    run, rows, summary = _train(tmp_path, tiny_model_dir, "times")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert 0 < r["data_s"] < r["step_s"] < 60 and r["host_s"] >= 0
        assert 0 <= r["gc_s"] < r["step_s"] and r["alloc_retries"] == r["device_allocs"] == 0  # no CUDA allocator
    assert rows[0]["host_s"] == 0  # nothing ran before the first step
    later = sorted(r["step_s"] for r in rows[1:])
    assert summary["step_s_median"] == pytest.approx(statistics.median(later))  # steps 2..8
    assert summary["step_s_max"] == max(later)
    assert rows[summary["slowest_step"] - 1]["step_s"] == summary["step_s_max"]
    assert not (run / "profile.txt").exists()  # train.profile_step=0: no profiler


def test_a_planted_stall_is_found_named_and_printed(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Step 5 sleeps inside its collate (where a lazily built kernel or an allocator's growth would cost it)
    for 4x the longest step before it, plus 1 s: the summary names it, and the end of the run says so in one
    line. (Relative to the steps before: the CPU may be shared, so a fixed sleep could hide among slow steps.)"""
    import slimtune.engine.loop as loop
    real, calls = loop.collate_micro, []

    def collate(*args, **kwargs):
        calls.append(time.perf_counter())
        if len(calls) == 9:  # two micro-batches a step: the first of step 5
            longest = max(b - a for a, b in zip(calls[2:9:2], calls[4:9:2]))  # steps 2..4, start to start
            time.sleep(4 * longest + 1.0)
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, "collate_micro", collate)
    _, rows, summary = _train(tmp_path, tiny_model_dir, "stall")
    assert rows[4]["step_s"] > 1.0 and rows[4]["data_s"] > 1.0
    assert summary["slowest_step"] == 5 and 5 in [s for s, _ in summary["stalls"]]
    out = capsys.readouterr().out
    n = summary["stall_count"]
    assert f"warning: {n} step(s) took over 2x the median step's time per token" in out
    assert f"step 5: {rows[4]['step_s']:.2f} s" in out


def test_a_planted_garbage_collection_is_counted_and_named(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Step 5 runs a full garbage collection made to last 4x the longest step before it, plus 1 s (a callback
    registered before fit's sleeps as the collection ends): its gc_s holds that time and the stall's line says
    so. On the CPU nothing is frozen (timing.Pauses freezes on CUDA)."""
    import slimtune.engine.loop as loop
    real, calls, frozen, slow = loop.collate_micro, [], [], {}

    def slow_end(phase, info):
        if phase == "stop" and slow.pop("s", None):
            time.sleep(slow_end.seconds)

    def collate(*args, **kwargs):
        calls.append(time.perf_counter())
        frozen.append(gc.get_freeze_count())
        if len(calls) == 9:  # two micro-batches a step: the first of step 5
            slow_end.seconds = 4 * max(b - a for a, b in zip(calls[2:9:2], calls[4:9:2])) + 1.0
            slow["s"] = True
            gc.collect()
        return real(*args, **kwargs)
    monkeypatch.setattr(loop, "collate_micro", collate)
    gc.callbacks.append(slow_end)
    try:
        before = gc.get_freeze_count()
        _, rows, summary = _train(tmp_path, tiny_model_dir, "gc")
    finally:
        gc.callbacks.remove(slow_end)
    assert before == 0 and max(frozen) == 0 and gc.get_freeze_count() == 0
    assert rows[4]["gc_s"] >= slow_end.seconds and rows[4]["step_s"] >= rows[4]["gc_s"]
    assert max(r["gc_s"] for i, r in enumerate(rows) if i != 4) < 1.0
    assert 5 in [s for s, _ in summary["stalls"]]
    assert f"step 5: {rows[4]['step_s']:.2f} s ({rows[4]['gc_s']:.2f} s in garbage collection)" in \
        capsys.readouterr().out


def test_pauses_freezes_the_objects_alive_at_its_start_and_unfreezes_them_after():
    """freeze=True (the default on CUDA): inside, every object alive at the start is frozen, so a full collection
    scans only the newer ones; after, none is, also where objects were already frozen before (gc unfreezes all or
    none; standing aside for them left a GPU run's full collections scanning 706,000 objects)."""
    with timing.Pauses("cpu", freeze=True) as pauses:
        assert gc.get_freeze_count() > 100_000  # torch, transformers, the test session
        kept = [[i] for i in range(50_000)]
        assert 50_000 <= len(gc.get_objects()) < 80_000  # what a full collection now scans: the newer objects
        gc.collect()
        assert pauses.read()["gc_s"] > 0 and pauses.read()["gc_s"] == 0  # read resets
    assert gc.get_freeze_count() == 0 and len(kept) == 50_000
    gc.freeze()
    try:
        kept = [[i] for i in range(50_000)]  # made after someone else's freeze
        with timing.Pauses("cpu", freeze=True) as pauses:
            assert len(gc.get_objects()) < 50_000  # frozen all the same
            pauses.settle()
            assert len(gc.get_objects()) < 50_000
        assert gc.get_freeze_count() == 0 and len(kept) == 50_000
    finally:
        gc.unfreeze()


def test_settle_freezes_what_the_first_step_made_and_what_a_later_full_collection_found_alive():
    """After the first step: collect, then freeze what is left; later, only after a full collection, freeze its
    survivors (each object scanned by one full collection at most); nothing where Pauses did not freeze."""
    with timing.Pauses("cpu", freeze=True) as pauses:
        start = gc.get_freeze_count()
        made = [[i] for i in range(20_000)]  # the first step's long-lived objects
        pauses.settle()  # its first call: the first step
        assert gc.get_freeze_count() >= start + 20_000 and len(gc.get_objects()) < 20_000
        later = [[i] for i in range(10_000)]
        pauses.settle()  # no full collection since: nothing frozen
        assert len(gc.get_objects()) >= 10_000
        gc.collect(1)  # a young collection: still nothing
        pauses.settle()
        assert len(gc.get_objects()) >= 10_000
        gc.collect()  # a full one: its survivors frozen
        pauses.settle()
        assert len(gc.get_objects()) < 10_000 and gc.get_freeze_count() >= start + 30_000
    assert gc.get_freeze_count() == 0 and len(made) + len(later) == 30_000
    with timing.Pauses("cpu") as pauses:  # no freeze on the CPU by default: settle leaves gc alone
        gc.collect()
        pauses.settle()  # its first call: the first step
        assert gc.get_freeze_count() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA caching allocator's counters need a GPU")
def test_pauses_counts_the_cuda_allocators_new_device_allocations_and_freezes_on_cuda():
    with timing.Pauses("cuda") as pauses:
        assert gc.get_freeze_count() > 100_000 and len(gc.get_objects()) < 100_000  # the default on CUDA
        pauses.read()
        big = torch.empty(3 * 2**30, dtype=torch.uint8, device="cuda")  # more than any cached block
        got = pauses.read()
        assert got["device_allocs"] >= 1 and got["alloc_retries"] == 0
        assert pauses.read()["device_allocs"] == 0
        del big
    assert gc.get_freeze_count() == 0


def test_pauses_names_what_a_stalled_step_held():
    assert timing.cause({"gc_s": 0.314, "alloc_retries": 2, "device_allocs": 0}) == \
        " (0.31 s in garbage collection, 2 allocator retries)"
    assert timing.cause({"gc_s": 0.0, "alloc_retries": 0, "device_allocs": 3}) == " (3 new device allocations)"
    assert timing.cause({"gc_s": 0.002, "alloc_retries": 0, "device_allocs": 0}) == "" and timing.cause(None) == ""


def test_profile_step_writes_the_busiest_ops_of_two_steps(tmp_path, tiny_model_dir):
    run, rows, _ = _train(tmp_path, tiny_model_dir, "prof", profile_step=3)
    text = (run / "profile.txt").read_text()
    assert text.startswith("torch.profiler over steps 3-4 (train.profile_step=3)")
    assert "By device time" in text and "By host time" in text
    assert "slimtune step 3" in text and "slimtune step 4" in text and "slimtune step 5" not in text
    assert "aten::mm" in text  # the layers' matmuls are in it
    assert len(rows) == STEPS


def test_profile_with_stacks_names_the_frames_that_made_each_copy(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(timing, "STACKS", True)
    run, _, _ = _train(tmp_path, tiny_model_dir, "stacks", profile_step=3)
    text = (run / "profile.txt").read_text()
    assert "By where they were called" in text
    part = text.split("By where they were called")[1]
    heads = [line for line in part.splitlines() if line.startswith("aten::")]
    assert heads and all(line.split(" x")[0] in timing.STACK_OPS for line in heads)
    frames = [line for line in part.splitlines() if line.startswith("    ")]
    assert any(".py(" in line for line in frames)  # Python frames under a forward's copies
    assert any("autograd::engine::evaluate_function" in line for line in frames)  # the node around a backward's


def test_profile_step_past_the_end_writes_nothing_and_a_run_ending_inside_writes_its_table(tmp_path,
                                                                                          tiny_model_dir):
    run, _, _ = _train(tmp_path, tiny_model_dir, "late", profile_step=STEPS + 5)
    assert not (run / "profile.txt").exists()
    run, _, _ = _train(tmp_path, tiny_model_dir, "last", profile_step=STEPS)  # step STEPS + 1 never runs
    assert "slimtune step 8" in (run / "profile.txt").read_text()


def test_idle_is_the_window_less_the_union_of_device_intervals_with_the_longest_gaps_named():
    from slimtune.engine.timing import idle

    busy = [(10, 30), (20, 40), (70, 80), (85, 95), (0, 5)]  # overlapping, and one before the window
    host = [(0, 100, "step"), (38, 50, "launch a"), (45, 72, "aten::copy_"), (80, 90, "aten::mm")]
    got = idle(busy, host, (8, 100), top=3)
    assert got["window"] == 92 and got["busy"] == 30 + 10 + 10  # [10, 40], [70, 80], [85, 95]
    # gaps: [40, 70] 30, [95, 100] 5, [80, 85] 5, [8, 10] 2; each named by the innermost op at its ends
    assert got["gaps"] == [(30, "launch a", "aten::copy_"), (5, "step", "step"), (5, "aten::mm", "aten::mm")]


def test_profile_text_gets_the_device_idle_lines_from_the_events():
    from types import SimpleNamespace as NS

    import torch

    from slimtune.engine.timing import _idle_text

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def ev(name, start, end, kind=cpu):
        return NS(name=name, device_type=kind, time_range=NS(start=start, end=end))
    events = [ev("slimtune step 3", 0, 10_000), ev("aten::mm", 100, 900), ev("cudaLaunchKernel", 100, 110),
              ev("gemm", 200, 4_000, cuda), ev("_LoraLinearBackward", 3_900, 9_000), ev("gemm", 6_000, 10_000, cuda)]
    text = _idle_text(events)
    assert "Device idle: 10.0 ms of steps, busy 7.8 ms (78%)" in text
    assert "2.00  _LoraLinearBackward -> _LoraLinearBackward" in text  # the 4-6 ms gap; cudaLaunchKernel not named
    assert _idle_text([e for e in events if e.device_type == cpu]) == ""  # the CPU: no device, no lines
