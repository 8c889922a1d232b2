"""bench/run.py, its GPU sessions (bench/stages.py) and the results table (bench/table.py -> docs/benchmarks.md)."""
import argparse
import json
import signal
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import run  # noqa: E402
import speed  # noqa: E402
import stages  # noqa: E402
import table  # noqa: E402


def _row(**kw):
    return dict(dict(bench="speed", size="1b", peak_gib=3.5, peak_reserved_gib=4.0, steps=20), **kw)


def test_table_groups_by_date_and_device_newest_first(tmp_path):
    lines = [
        _row(date="2026-01-01", device="GPU A", recipe="defaults", real_tok_s=1000, step_s=[0.5, 0.25, 1.0]),
        _row(date="2026-01-02", device="GPU A", recipe="unsloth | padded", real_tok_s=2000, step_s_median=0.4,
             step_s_max=2.5),
        _row(date="2026-01-02", device="GPU B", recipe="defaults", real_tok_s=0, size="8b"),
        dict(bench="memory_grid", date="2026-01-02", device="GPU A"),
    ]
    text = "\n".join(json.dumps(r) for r in lines) + "\nnot json\n"
    (tmp_path / "2026-01-02-a.jsonl").write_text(text + json.dumps(lines[0]) + "\n")  # an exact repeat: once
    md = table.render(table.load(tmp_path))
    heads = [line for line in md.splitlines() if line.startswith("### ")]
    assert heads == ["### 2026-01-02, GPU B", "### 2026-01-02, GPU A", "### 2026-01-01, GPU A"]
    assert "| 1b | unsloth \\| padded | 2,000 | 3.50 (4.00) | 20 | 0.400 / 2.500 |" in md
    assert "| 1b | defaults | 1,000 | 3.50 (4.00) | 20 | 0.500 / 1.000 |" in md  # median of step_s
    assert "| 8b | defaults | failed | 3.50 (4.00) | 20 |  |" in md
    assert md.count("| 1b | defaults | 1,000 |") == 1
    assert "| bench/results/2026-01-02-a.jsonl | 1 memory_grid, 4 speed |" in md


def test_table_splits_a_day_into_runs_where_a_recipe_repeats_and_keeps_their_notes(tmp_path):
    day = dict(date="2026-01-03", device="GPU A")
    lines = [_row(recipe="defaults", real_tok_s=10, **day), _row(recipe="unsloth", real_tok_s=20, **day),
             dict(date="2026-01-03", session_note="first run: another workload"),
             _row(recipe="defaults", real_tok_s=30, **day)]
    (tmp_path / "x.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    md = table.render(table.load(tmp_path))
    assert "Run 1 of 2 (bench/results/x.jsonl):" in md and "Run 2 of 2 (bench/results/x.jsonl):" in md
    first, second = md.split("Run 2 of 2")
    assert "| 10 |" in first and "| 20 |" in first and "Note: first run: another workload" in first
    assert "| 30 |" in second and "Note:" not in second


def test_table_lists_each_long_context_cell_once_with_its_bound_and_peak(tmp_path):
    cell = dict(bench="long_context", device="GPU A", size="8b", method="qlora", cap_gib=24.0, r=32, quick=False)
    tried = [dict(tokens=16384, ok=True, peak_gib=10.1), dict(tokens=147456, ok=True, peak_gib=22.53)]
    lines = [dict(cell, tool="slimtune", longest_tokens=147456, shortest_failed=None, bounded_by_time=True,
                  tok_s_at_16k=6502, tried=tried),
             dict(cell, tool="unsloth", longest_tokens=65536, shortest_failed=81920, bounded_by_time=False,
                  tok_s_at_16k=3000, tried=[dict(tokens=65536, ok=True, peak_gib=21.0)]),
             dict(cell, tool="slimtune", quick=True, longest_tokens=131072, tried=[]),  # --quick: not a cell
             dict(cell, tool="unsloth", not_run="no wheel")]  # no longest: nothing to show
    text = "\n".join(json.dumps(r) for r in lines) + "\n"
    (tmp_path / "2026-01-04-h100.jsonl").write_text(text + json.dumps(lines[0]) + "\n")  # a repeat: once
    md = table.render(table.load(tmp_path))
    assert "## The longest record that trains (bench/long_context.py)" in md
    ours = "| 2026-01-04-h100.jsonl | GPU A | 8b | qlora | 24.0 | slimtune | >= 147,456 |  | 22.53 | 6,502 |"
    assert md.count(ours) == 1
    assert "| 2026-01-04-h100.jsonl | GPU A | 8b | qlora | 24.0 | unsloth | 65,536 | 81,920 | 21.0 | 3,000 |" in md
    assert "131,072" not in md and "no wheel" not in md
    assert "## The longest record" not in table.render([])


def test_docs_benchmarks_md_is_generated_from_bench_results():
    want = table.render(table.load(ROOT / "bench" / "results"))
    assert (ROOT / "docs" / "benchmarks.md").read_text() == want, "run: python bench/run.py table"
    assert table.main(["--check"]) == 0


def test_table_check_fails_on_a_stale_file(tmp_path, capsys):
    (tmp_path / "r.jsonl").write_text(json.dumps(_row(date="d", device="g", recipe="defaults", real_tok_s=5)) + "\n")
    stale = tmp_path / "b.md"
    stale.write_text("old\n")
    assert table.main(["--results", str(tmp_path), "--out", str(stale), "--check"]) == 1
    assert "not up to date" in capsys.readouterr().err
    assert table.main(["--results", str(tmp_path), "--out", str(stale)]) == 0
    assert "| 1b | defaults | 5 |" in stale.read_text()


def test_run_forwards_arguments_to_the_script(monkeypatch):
    calls = []
    monkeypatch.setattr(run.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert run.main(["speed", "--sizes", "1b,8b", "--recipes", "defaults,unsloth"]) == 0
    assert calls == [[sys.executable, str(ROOT / "bench" / "speed.py"), "--sizes", "1b,8b", "--recipes",
                      "defaults,unsloth"]]
    assert all((ROOT / "bench" / script).is_file() for script, _ in run.SCRIPTS.values())
    assert run.main(["no-such-bench"]) == 2
    assert run.main(["speed-1b", "--sizes", "8b"]) == 2  # a session takes only --out: its recipes are fixed


def _worst_case_seconds(steps):
    spent = 0
    for step in steps:
        if not (step.budget and spent > step.budget):
            spent += step.limit
    return spent


@pytest.mark.parametrize("name", sorted(stages.STAGES))
def test_each_session_fits_one_ten_minute_call_and_names_what_exists(name):
    steps = stages.STAGES[name][1]
    assert _worst_case_seconds(steps) <= 570  # leaves the wheel install its time in a 600 s call
    a = argparse.Namespace(steps=20, warmup=2)
    for step in steps:
        if step.cmd[0] == "-m":
            paths = [p.split("::")[0] for p in step.cmd[4:] if p.startswith("tests/")]
            assert paths and all((ROOT / p).exists() for p in paths), step.cmd
            continue
        assert (ROOT / step.cmd[0]).is_file(), step.cmd
        if step.cmd[0] == "bench/speed.py":  # every recipe is one speed.py knows (unknown ones exit)
            recipes = step.cmd[step.cmd.index("--recipes") + 1]
            for recipe in recipes.split(","):
                assert speed.recipe_commands(recipe, "1b", a)


def test_a_step_keeps_its_tail_without_warnings_and_stops_at_its_limit(tmp_path, capsys):
    say = stages.Step(["-c", "print('UserWarning: x'); [print(i) for i in range(5)]"], 30, tail=2)
    logged = []
    assert stages.run_step(say, str(tmp_path), logged.append) == 0
    assert (tmp_path / "gpu_tests.log").read_text() == "3\n4\n"
    assert capsys.readouterr().out == "3\n4\n"
    slow = stages.Step(["-c", "import time; time.sleep(60)"], 1)
    assert stages.run_step(slow, str(tmp_path), logged.append) == -signal.SIGKILL
    assert logged[-1] == "rc -9 (its time limit)"


def test_a_session_runs_every_step_packs_the_logs_and_reports_a_failure(tmp_path, monkeypatch):
    logs = tmp_path / "logs"
    monkeypatch.setattr(stages, "LOGS", logs)
    monkeypatch.setitem(stages.STAGES, "tiny", ("two steps", [
        stages.Step(["-c", "import os, pathlib; pathlib.Path(os.environ['SPEED_LOG_DIR'], 'w.log').write_text('x')"],
                    30),
        stages.Step(["-c", "import sys; sys.exit(3)"], 30),
        stages.Step(["-c", "import os, pathlib; pathlib.Path(os.environ['OUT'], 'last').write_text('ran')"], 30)]))
    out = tmp_path / "out"
    assert run.main(["tiny", "--out", str(out)]) == 1  # the failed step does not stop the next one
    assert (out / "last").read_text() == "ran"
    with tarfile.open(out / "logs.tgz") as tar:
        assert "./w.log" in tar.getnames()
