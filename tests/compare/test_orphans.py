"""A compare killed with SIGKILL leaves no child training on: Linux's parent-death signal stops it (it saves
its checkpoint first), and where that did not reach it, the next compare on the folder stops it; two compares
on one folder are refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import lora_run_config
from slimtune.compare import child, runner, spec
from slimtune.runs import checkpoint, ownership

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def _config(tmp: Path, model_dir: Path, **train) -> Path:
    cfg = lora_run_config(tmp, model_dir, "unused", eval_max_records=2, eval_max_new_tokens=4, **train)
    tree = yaml.safe_load(cfg.read_text())
    tree["compare"] = {"methods": ["lora"]}
    cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    return cfg


def _wait(check, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_sigkilled_compares_training_child_checkpoints_and_stops(tmp_path, tiny_model_dir):
    """Issue 27: a SIGKILLed `slimtune compare` left its running row's training child orphaned, training on."""
    cfg, out = _config(tmp_path, tiny_model_dir, max_steps=100000, save_every=0), tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "slimtune", "compare", str(cfg), "--output", str(out)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = out / "runs" / "lora" / "metrics.jsonl"
    try:
        _wait(lambda: metrics.is_file() and '"loss"' in metrics.read_text(), 240, "the row never started training")
        pid = json.loads((out / runner.CHILD).read_text())["pid"]
        assert not _gone(pid)
    finally:
        proc.kill()  # SIGKILL: compare runs no handler, forwards nothing
        proc.wait()
    try:
        _wait(lambda: _gone(pid), 60, f"the training child {pid} trains on, orphaned")
    finally:
        if not _gone(pid):  # the test's own leftover: not left to train for hours
            os.kill(pid, signal.SIGKILL)
    assert checkpoint.latest(out / "runs" / "lora") is not None  # it stopped as on Ctrl-C: resumable
    # once: the kernel repeats the parent-death signal per thread of the dying compare, and a second SIGTERM
    # would stop training in the middle of that save
    assert (out / "logs" / "lora.train.log").read_text().count("SIGTERM: saving a checkpoint") == 1


ORPHAN = """import pathlib, signal, sys, time
def stop(*a):
    pathlib.Path(sys.argv[1] + ".stopped").write_text("SIGTERM")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
pathlib.Path(sys.argv[1] + ".ready").write_text("")
time.sleep(120)
"""


def test_a_new_compare_on_the_folder_stops_a_child_left_running(tmp_path, tiny_model_dir):
    """Where no parent-death signal reached it (not Linux, or compare died between fork and prctl), the
    orphan is named in DIR/child.json: the next compare there sends it SIGTERM before going on."""
    cfg, out = _config(tmp_path, tiny_model_dir, max_steps=2), tmp_path / "out"
    comparison = spec.load(cfg)
    (out / "results").mkdir(parents=True)
    (out / "results" / "lora.json").write_text(json.dumps({"label": "lora", "status": "done"}))  # nothing to run
    peak = out / "logs" / "lora.train.peak.json"
    peak.parent.mkdir()
    orphan = subprocess.Popen([sys.executable, "-c", ORPHAN, str(peak)])
    try:
        _wait(lambda: Path(f"{peak}.ready").is_file(), 60, "the stand-in child did not start")
        (out / runner.CHILD).write_text(json.dumps({"pid": orphan.pid, "peak": str(peak), "log": "x.log"}))
        lines = []
        rows = runner.run_comparison(comparison, out, lines.append)
        assert orphan.wait(timeout=10) == 0 and Path(f"{peak}.stopped").read_text() == "SIGTERM"
    finally:
        orphan.kill()
    assert rows == [{"label": "lora", "status": "done"}] and not (out / runner.CHILD).exists()
    assert lines[0].startswith(f"compare: PID {orphan.pid}, a child of an earlier compare killed here, is still "
                               "running (x.log); stopping it")
    # a record whose PID is now another process (here: this one) is not that child: nothing is sent
    (out / runner.CHILD).write_text(json.dumps({"pid": os.getpid(), "peak": str(peak), "log": "x.log"}))
    said = len(lines)
    assert child.stop_orphan(out / runner.CHILD, lines.append, wait=0) is None and len(lines) == said
    assert not (out / runner.CHILD).exists()


def test_a_second_compare_on_a_folder_in_use_is_refused(tmp_path, tiny_model_dir):
    cfg, out = _config(tmp_path, tiny_model_dir, max_steps=2), tmp_path / "out"
    out.mkdir()
    with ownership.Lock(out, log=lambda *a: None):
        with pytest.raises(ownership.RunFolderError, match=rf"^--output: {out} is in use by another slimtune "
                           rf"compare \(PID {os.getpid()}\); wait for it, stop it, or choose another --output$"):
            runner.run_comparison(spec.load(cfg), out, print)
    assert not (out / "runs").exists() and not (out / "config.yaml").exists()
