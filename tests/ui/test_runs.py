"""A run's state read from its folder: the lock's holder, the status and progress, new metrics rows as events."""
from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

from slimtune.runs import ownership
from slimtune.ui import runs, sse
from slimtune.ui.paths import Roots


def test_holder_is_the_pid_while_the_lock_is_held(tmp_path):
    assert ownership.holder(tmp_path) is None
    with ownership.Lock(tmp_path, log=lambda *a: None):
        assert ownership.holder(tmp_path) == os.getpid()
    assert ownership.holder(tmp_path) is None
    (tmp_path / ownership.LOCK).write_text("12345\n")  # left by a killed run: nobody holds it
    assert ownership.holder(tmp_path) is None


def test_progress_and_remaining_time_from_rows_and_log():
    rows = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.0, "elapsed_s": 2.0},
            {"step": 2, "loss": 1.5, "elapsed_s": 4.0}]
    log = ["step 1/10: loss 2.0", "step 2/10: loss 1.5"]
    assert runs.progress(rows, log, None, None) == {"step": 2, "total": 10, "elapsed_s": 4.0, "remaining_s": 16.0}
    assert runs.progress(rows, [], {"train": {"max_steps": 4}}, None)["remaining_s"] == 4.0
    assert runs.progress([], [], None, None) == {"step": 0, "total": None, "elapsed_s": 0.0, "remaining_s": None}


def test_a_resumed_run_cutting_its_metrics_starts_the_stream_over(tmp_path):
    launcher = runs.Launcher(Roots.at(tmp_path))
    folder = tmp_path / "runs" / "r"
    folder.mkdir(parents=True)
    metrics = folder / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in (1, 2, 3)) + '{"step": 4')

    async def collect(stream):
        return [e async for e in stream]

    first = asyncio.run(collect(sse.follow(launcher, folder, polls=1)))
    assert first[0].startswith("event: rows") and len(json.loads(first[0].split("data: ")[1])) == 3  # not the half line
    assert json.loads(first[1].split("data: ")[1])["status"] == "new"
    rows, offset, cut = sse.new_rows(metrics, 10_000)
    assert (rows, offset, cut) == ([], 0, True)  # shorter than where the stream was: resumed, cut back


def test_a_command_that_fails_is_reaped_though_no_page_looks(tmp_path):
    """Issue 27: a compare started from the app that failed stayed a zombie under the server for over 16
    minutes: it was reaped only when a page asked for that folder's state."""
    launcher = runs.Launcher(Roots.at(tmp_path))
    pid = launcher.launch(tmp_path / "runs" / "c", ["compare", str(tmp_path / "missing.yaml")], "compare")["pid"]
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # a zombie keeps its /proc entry
        time.sleep(0.2)
    assert not Path(f"/proc/{pid}").exists()
    assert "config file not found" in launcher.log_path(tmp_path / "runs" / "c").read_text()
