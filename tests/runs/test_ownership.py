"""A run folder is the user's folder too: slimtune deletes only what it wrote there (the manifest says
what), one process trains in it at a time, a stopped run exits non-zero, and a folder that can't be
written stops the run in one line before any slow work."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import lora_run_config, write_jsonl
from slimtune import cli, train
from slimtune.engine import preflight
from slimtune.runs import checkpoint, ownership


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under the folder (relative path -> sha256): what "untouched" means below."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_files(folder: Path) -> None:
    (folder / "my_notes.txt").write_text("mine, not slimtune's")
    (folder / "src").mkdir()
    (folder / "src" / "main.py").write_text("print('hello')\n")


def _run(tmp: Path, model_dir: Path, name: str = "run", **train_keys) -> Path:
    return lora_run_config(tmp, model_dir, name, copies=1, **{"max_steps": 2, "micro_batch_size": 2,
                                                              "eval_at_start": False, **train_keys})


@pytest.fixture
def finished(tmp_path, tiny_model_dir):
    """A finished 2-step run (checkpoint at step 2) with the user's own files added afterwards."""
    cfg = _run(tmp_path, tiny_model_dir)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    _user_files(tmp_path / "run")
    return cfg, tmp_path / "run"


def test_project_folder_survives_resume_and_overwrite(tmp_path, tiny_model_dir, capsys):
    """The issue's case: config.yaml whose output_dir is its own folder, beside data, notes and src/."""
    proj = tmp_path / "proj"
    proj.mkdir()
    data = write_jsonl(proj / "data.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(8)])
    tree = {"model": {"path": str(tiny_model_dir)}, "data": {"train": str(data), "eval_size": 2},
            "method": {"name": "lora", "r": 2}, "train": {"output_dir": str(proj), "max_steps": 1, "device": "cpu"}}
    (proj / "config.yaml").write_text(yaml.safe_dump(tree))
    _user_files(proj)
    before = _snapshot(proj)
    no_checkpoint = f"train.output_dir: {proj} has no complete checkpoint in {proj / 'checkpoints'}"
    for flag, message in (("--resume", no_checkpoint),
                          ("--overwrite", f"train.output_dir: {proj} already holds files that are not a slimtune run"),
                          ("--no-progress", "already holds files that are not a slimtune run")):
        assert cli.main(["train", str(proj / "config.yaml"), flag]) == 2, flag
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert _snapshot(proj) == before, flag  # not one byte changed, nothing added


def test_output_dir_dot_with_overwrite_keeps_the_working_directory(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cfg = _run(tmp_path, tiny_model_dir, output_dir=".")
    work = tmp_path / "work"
    work.mkdir()
    _user_files(work)
    monkeypatch.chdir(work)
    before = _snapshot(work)
    assert cli.main(["train", str(cfg), "--overwrite", "--no-progress"]) == 2  # the user's folder, not a run
    assert "not a slimtune run" in capsys.readouterr().err
    assert _snapshot(work) == before
    # an empty working directory becomes a run; the user's files added later survive --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    _user_files(empty)
    events = list(empty.glob("events.out.tfevents.*"))
    assert cli.main(["train", str(cfg), "--overwrite", "--no-progress"]) == 0
    assert (empty / "my_notes.txt").read_text() == "mine, not slimtune's"
    assert (empty / "src" / "main.py").read_text() == "print('hello')\n"
    assert not any(p.exists() for p in events)  # the old run's logs went; the new run wrote its own
    assert len(list(empty.glob("events.out.tfevents.*"))) == 1
    assert [r["step"] for r in map(json.loads, (empty / "metrics.jsonl").read_text().splitlines()) if "loss" in r] \
        == [1, 2]
    manifest = json.loads((empty / ownership.MANIFEST).read_text())
    assert manifest["user_files"] == ["my_notes.txt", "src"] and manifest["created_folder"] is False


def test_resume_of_a_finished_run_without_checkpoints_says_so_and_deletes_nothing(finished, capsys):
    cfg, run = finished
    shutil.rmtree(run / checkpoint.ROOT)
    before = _snapshot(run)
    assert cli.main(["train", str(cfg), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"train.output_dir: {run} holds a finished run (its adapter is saved) and no complete checkpoint" in err
    assert "--overwrite to train it again" in err
    assert _snapshot(run) == before


def test_resume_with_no_checkpoint_is_an_error_naming_the_folder(finished, capsys):
    cfg, run = finished
    shutil.rmtree(run / checkpoint.ROOT)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (run / name).unlink()  # a run killed before its first checkpoint
    assert cli.main(["train", str(cfg), "--resume", "--no-progress"]) == 2
    assert f"train.output_dir: {run} has no complete checkpoint in {run / 'checkpoints'} to resume from; pass " \
           "--overwrite to train it again" in capsys.readouterr().err
    assert (run / "metrics.jsonl").is_file() and (run / "my_notes.txt").is_file()


def test_resume_adopts_a_run_written_before_manifests(finished, capsys):
    cfg, run = finished
    (run / ownership.MANIFEST).unlink()  # as slimtune wrote run folders before this change
    assert cli.main(["train", str(cfg), "--overwrite", "--no-progress"]) == 2  # not provably slimtune's
    assert "not a slimtune run" in capsys.readouterr().err
    assert cli.main(["train", str(cfg), "--resume", "--no-progress"]) == 0  # resuming deletes nothing
    assert ownership.read_manifest(run)["user_files"] == ["my_notes.txt", "src"]


def test_overwrite_removes_only_slimtune_files(finished, capsys):
    cfg, run = finished
    (run / "checkpoints" / "mine.txt").write_text("a user file inside a folder slimtune made")
    assert cli.main(["train", str(cfg), "--overwrite", "--no-progress"]) == 0
    assert (run / "my_notes.txt").read_text() == "mine, not slimtune's"
    assert (run / "src" / "main.py").is_file()
    assert "removed the earlier run's" in capsys.readouterr().out
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]  # the folder was slimtune's
    manifest = ownership.read_manifest(run)  # it names everything train wrote: nothing escapes --overwrite
    assert set(ownership.own(run, manifest)) | {"my_notes.txt", "src"} == ownership.entries(run)
    assert {"adapter_model.safetensors", "metrics.jsonl", "eval", "README.md"} <= set(ownership.own(run, manifest))
    assert not list(run.glob(ownership.OLD + "*"))


def test_overwrite_never_removes_what_the_run_reads(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cfg = _run(tmp_path, tiny_model_dir)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    data = write_jsonl(run / "eval" / "data.jsonl", [{"instruction": f"q{i}", "output": "a"} for i in range(8)])
    before = _snapshot(run)
    monkeypatch.setattr(preflight, "build", _never_encode)  # refused before the slow work
    assert cli.main(["train", str(cfg), f"data.train={data}", "--overwrite", "--no-progress"]) == 2
    assert f"train.output_dir: --overwrite would remove {run / 'eval'}, which is or holds {data} that this run " \
        "reads; move it out of the run folder first" in capsys.readouterr().err
    assert _snapshot(run) == before
    monkeypatch.undo()
    # the run's own config.yaml, given as the config: read, then rewritten with the same settings
    assert cli.main(["train", str(run / "config.yaml"), "--overwrite", "--no-progress"]) == 0
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r] \
        == [1, 2]


def test_a_manifest_claiming_every_file_removes_only_slimtune_names(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "notes.txt").write_text("mine")
    (out / ownership.MANIFEST).write_text(json.dumps({"writes": ["*", "metrics.jsonl"], "user_files": []}))
    assert ownership.remove_own(out, ownership.read_manifest(out), []) == ["metrics.jsonl"]
    assert sorted(ownership.entries(out)) == [ownership.MANIFEST, "notes.txt"]


def test_a_failed_check_writes_nothing(tmp_path, tiny_model_dir, capsys):
    cfg = _run(tmp_path, tiny_model_dir)
    assert cli.main(["train", str(cfg), "method.target_modules=qkv_proj", "--no-progress"]) == 2
    assert "qkv_proj" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # the next try needs no --overwrite
    (tmp_path / "run").mkdir()
    assert cli.main(["train", str(cfg), "method.target_modules=qkv_proj", "--no-progress"]) == 2
    assert list((tmp_path / "run").iterdir()) == []
    # a folder holding only what a run writes before its first step counts as empty
    ownership.write_manifest(tmp_path / "run", True, set())
    (tmp_path / "run" / "config.yaml").write_text("train: {}\n")
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0


def test_prune_killed_mid_delete_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / checkpoint.ROOT
    for step in (1, 2, 3):
        folder = root / f"step-{step:06d}"
        folder.mkdir(parents=True)
        for name in ("adapter_model.safetensors", checkpoint.STATE, checkpoint.DONE):
            (folder / name).write_text("x")
    real = shutil.rmtree

    def killed(path, *args, **kwargs):  # deletes the weights, then the process dies
        Path(path, "adapter_model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(root, 2)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real)
    # the half-deleted folder no longer has a step name: never picked, and the next run removes it
    assert [p.name for _, p in checkpoint.complete(root)] == ["step-000002", "step-000003"]
    assert [p.name for p in root.iterdir() if p.name.startswith(".old-step-000001-")]
    checkpoint.clean(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000003"]


def test_prune_leftover_is_cleaned_by_the_next_run(finished):
    cfg, run = finished
    leftover = run / checkpoint.ROOT / ".old-step-000001-4242"
    leftover.mkdir()
    (leftover / checkpoint.DONE).write_text("{}")
    assert cli.main(["train", str(cfg), "--resume", "--no-progress"]) == 0
    assert not leftover.exists()


HOLD = """
import sys, time
from pathlib import Path
from slimtune.runs.ownership import Lock
with Lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_process_is_refused_naming_the_pid_and_a_dead_ones_lock_is_taken_over(tmp_path, tiny_model_dir,
                                                                                        capsys):
    cfg = _run(tmp_path, tiny_model_dir)
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cli.main(["train", str(cfg), "--resume", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"train.output_dir: {tmp_path / 'run'} is in use by another slimtune process (PID {holder.pid}" in err
    finally:
        holder.kill()  # SIGKILL: its lock file stays, with its PID
        holder.wait()
    assert (tmp_path / "run" / ownership.LOCK).read_text().strip() == str(holder.pid)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    assert f"took over the lock of PID {holder.pid}, which is no longer running" in capsys.readouterr().out
    assert not (tmp_path / "run" / ownership.LOCK).exists()


def test_a_lock_is_held_against_this_process_too(tmp_path):
    with ownership.Lock(tmp_path):
        with pytest.raises(ownership.RunFolderError, match=f"PID {os.getpid()}"):
            ownership.Lock(tmp_path).__enter__()
    with ownership.Lock(tmp_path):  # released: free again
        pass


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)],
                         ids=["int", "term", "hup"])
def test_a_stopped_run_exits_with_the_signal_code(tmp_path, tiny_model_dir, sig, code):
    cfg = _run(tmp_path, tiny_model_dir, max_steps=500, save_every=0)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "slimtune", "train", str(cfg), "--no-progress"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 1) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == code, out
    assert f"{sig.name}: stopped after step" in out
    assert checkpoint.latest(tmp_path / "run") is not None


def _controlling_terminal():  # in the child, after setsid: stdin (the pty) becomes its terminal
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def test_closing_the_terminal_saves_a_checkpoint_and_exits_129(tmp_path, tiny_model_dir):
    """The terminal (or ssh session) closed under a run: the kernel sends SIGHUP and every later write to the
    terminal fails (EIO); the run still saves its checkpoint and exits 129 instead of dying unsaved."""
    import pty
    import select

    cfg = _run(tmp_path, tiny_model_dir, max_steps=500, save_every=0)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    master, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "slimtune", "train", str(cfg)], env=env, stdin=terminal,
                            stdout=terminal, stderr=terminal, start_new_session=True,
                            preexec_fn=_controlling_terminal)
    os.close(terminal)
    metrics, deadline, shown = tmp_path / "run" / "metrics.jsonl", time.monotonic() + 120, b""
    while not (metrics.exists() and metrics.read_text().count('"loss"') >= 1) and time.monotonic() < deadline:
        assert proc.poll() is None, shown.decode(errors="replace")
        if select.select([master], [], [], 0.05)[0]:  # read what it shows, as a terminal does (its buffer is small)
            shown += os.read(master, 65536)
    os.close(master)  # the terminal closes
    assert proc.wait(timeout=120) == 129, shown.decode(errors="replace")
    assert checkpoint.latest(tmp_path / "run") is not None
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


def _never_encode(*args, **kwargs):
    pytest.fail("the data were encoded before the output folder was checked")


def test_an_unwritable_output_folder_is_one_line_before_the_data_are_encoded(tmp_path, tiny_model_dir, monkeypatch,
                                                                              capsys):
    cfg = _run(tmp_path, tiny_model_dir)
    monkeypatch.setattr(preflight, "build", _never_encode)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["train", str(cfg), f"train.output_dir={blocker / 'run'}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"slimtune train: error: train.output_dir: cannot write to {blocker / 'run'}") and \
        "(ENOTDIR)" in err and len(err.splitlines()) == 1, err

    real_open = os.open

    def read_only(path, *args, **kwargs):  # as a read-only folder answers (root, running tests, ignores chmod)
        if Path(path).name == ownership.PROBE:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(ownership.os, "open", read_only)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"slimtune train: error: train.output_dir: cannot write to {tmp_path / 'run' / ownership.PROBE}: "
                   "Permission denied (EACCES); choose a folder you can write to (train.output_dir=...)")
    assert not (tmp_path / "run").exists()  # the folder it made for the probe is gone again


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_really(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cfg = _run(tmp_path, tiny_model_dir)
    (tmp_path / "run").mkdir(mode=0o555)
    monkeypatch.setattr(preflight, "build", _never_encode)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 2
    assert "Permission denied (EACCES)" in capsys.readouterr().err


def test_a_full_disk_is_one_line_before_the_data_are_encoded(tmp_path, tiny_model_dir, monkeypatch, capsys):
    cfg = _run(tmp_path, tiny_model_dir)
    monkeypatch.setattr(preflight, "build", _never_encode)

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ownership.os, "write", full)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"slimtune train: error: train.output_dir: cannot write to {tmp_path / 'run'}: No space left on "
                   "device (ENOSPC); choose a folder you can write to (train.output_dir=...), or free some space")


def test_a_full_disk_mid_run_is_one_line(finished, monkeypatch, capsys):
    cfg, run = finished

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "adapter_model.safetensors"))

    monkeypatch.setattr(train, "save", full)
    assert cli.main(["train", str(cfg), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after transformers' "Loading weights" bar
    assert err.startswith(f"slimtune train: error: writing {run / 'adapter_model.safetensors'} failed: No space "
                          "left on device (ENOSPC); the newest complete checkpoint is intact")


def test_a_model_folder_without_tokenizer_files_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    bare = tmp_path / "bare-model"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_model_dir / name, bare / name)
    cfg = _run(tmp_path, tiny_model_dir)
    monkeypatch.setattr(preflight, "build", _never_encode)
    assert cli.main(["train", str(cfg), f"model.path={bare}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"slimtune train: error: model.path: {bare} has no tokenizer files (expected one of "
                          "tokenizer.json,") and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()
