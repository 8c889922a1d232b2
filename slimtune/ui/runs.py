"""Runs the web app starts: `python -m slimtune train|compare ...` as background processes, and a run's state
read back from its folder, so a reloaded page, a second browser or a restarted server sees the same thing.

A run's own files (metrics.jsonl, checkpoints/, summary.json, the lock naming the training PID) say what it
did; the app adds, under RUNS/.slimtune-ui/, only the YAML it started the run with, the command's console log
and a small record of the launch (PID, command line), since those exist before the run writes anything."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from .. import config as config_mod
from .. import trust
from ..runs import checkpoint, ownership
from ..runs.metrics_log import read_metrics
from ..errors import SlimtuneError
from .paths import Roots

STEP = re.compile(r"^step (\d+)/(\d+):", re.MULTILINE)  # runs.metrics_log.step_line, printed with --no-progress
LOG_TAIL = 40  # log lines a page shows
DEPTH = 4  # run folders are looked for this many levels down (compare's rows are at DIR/runs/<label>)


class RunStateError(SlimtuneError):
    """A run that cannot be stopped or resumed as asked (not running, nothing to resume)."""


def slug(folder: Path) -> str:
    """A file name for a run folder's records: its path, readable."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(folder).strip("/"))[-120:]


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"  # an exited child not yet reaped is not running
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return True
        except (OSError, ProcessLookupError):
            return False


def _slimtune(pid: int) -> bool:
    """Whether the process is a slimtune command (a PID in an old record may have been reused since)."""
    try:
        return b"slimtune" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc (macOS): the PID alone


class Launcher:
    """Starts and stops the app's background commands; every state it reports comes from files."""

    def __init__(self, roots: Roots):
        self.roots = roots
        self._children: dict[int, subprocess.Popen] = {}  # reaped on every look, so none lingers as a zombie

    def _reap(self) -> None:
        for pid, child in list(self._children.items()):
            if child.poll() is not None:
                del self._children[pid]

    def record(self, folder: Path) -> dict | None:
        path = self.roots.ui / f"{slug(folder)}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def log_path(self, folder: Path) -> Path:
        return self.roots.ui / f"{slug(folder)}.log"

    def launch(self, folder: Path, argv: list[str], kind: str) -> dict:
        """`python -m slimtune ARGV` in the background, its output appended to the folder's log."""
        self.check_idle(folder)
        self.roots.ui.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "slimtune", *argv]
        with self.log_path(folder).open("a", encoding="utf-8") as log:
            log.write(f"$ slimtune {' '.join(argv)}\n")
            log.flush()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     cwd=self.roots.work, env=env, start_new_session=True)
        self._children[child.pid] = child
        # reaped the moment it exits, looked at or not: a compare that failed while no page polled stayed
        # a zombie under the server for 16 minutes
        threading.Thread(target=child.wait, name=f"reap-{child.pid}", daemon=True).start()
        rec = {"pid": child.pid, "argv": argv, "kind": kind, "folder": str(folder), "started": time.time()}
        (self.roots.ui / f"{slug(folder)}.json").write_text(json.dumps(rec) + "\n", encoding="utf-8")
        return rec

    def check_idle(self, folder: Path) -> None:
        pid = self.pid(folder)
        if pid:
            raise RunStateError(f"{folder}: a run is already going on there (PID {pid}); stop it first, or choose "
                                "another folder")

    def pid(self, folder: Path) -> int | None:
        """The PID working on this folder now: the trainer holding its lock, or the command the app started."""
        self._reap()
        held = ownership.holder(folder)
        if _alive(held):
            return held
        rec = self.record(folder)
        return rec["pid"] if rec and _alive(rec.get("pid")) and _slimtune(rec["pid"]) else None

    def start(self, cfg: config_mod.Config) -> dict:
        """Train per the form's config: its YAML is written beside the log, then `slimtune train YAML`."""
        folder = Path(cfg.train.output_dir)
        self.check_idle(folder)  # before its YAML is replaced
        self.roots.ui.mkdir(parents=True, exist_ok=True)
        yaml_path = self.roots.ui / f"{slug(folder)}.yaml"
        yaml_path.write_text(config_mod.dump(cfg), encoding="utf-8")
        return self.launch(folder, ["train", str(yaml_path), "--no-progress"], "train")

    def resume(self, folder: Path) -> dict:
        """`slimtune train FOLDER/config.yaml --resume`: on from the newest checkpoint."""
        if checkpoint.latest(folder) is None:
            raise RunStateError(f"{folder}: no complete checkpoint to resume from (a run stopped with Stop saves "
                                "one; a finished run has nothing left to do)")
        source = folder / "config.yaml"
        # the run's config.yaml never switches on the model's own code: only the command line does
        trust.decide(config_mod.load(source), source, False, run=True,
                     how=f"resume it on the command line, `slimtune train {source} --resume {trust.FLAG}`,")
        return self.launch(folder, ["train", str(source), "--resume", "--no-progress"], "train")

    def stop(self, folder: Path, sig: int = signal.SIGINT) -> int:
        """SIGINT, as Ctrl-C: training saves a resumable checkpoint at the next step and exits."""
        pid = self.pid(folder)
        if pid is None:
            raise RunStateError(f"{folder}: nothing is running there (the run finished or was stopped; Resume "
                                "continues a stopped one)")
        os.kill(pid, sig)
        return pid


def tail(path: Path, lines: int = LOG_TAIL) -> list[str]:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - 64 * 1024))
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return []
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:]]


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    try:
        return read_metrics(path)
    except (OSError, ValueError):  # not yet written, or a line being written
        return []


def status(folder: Path, pid: int | None, launched: bool) -> str:
    """running | done | stopped (resumable) | failed | new."""
    if pid:
        return "running"
    if (folder / "summary.json").is_file():
        return "done"
    if checkpoint.latest(folder) is not None:
        return "stopped"
    return "failed" if launched else "new"


def progress(rows: list[dict], log: list[str], cfg: dict | None, summary: dict | None) -> dict:
    """Step, total steps, elapsed and remaining seconds from the rows and the console log."""
    train = [r for r in rows if "loss" in r]
    step = train[-1]["step"] if train else 0
    found = STEP.findall("\n".join(log))
    total = int(found[-1][1]) if found else ((cfg or {}).get("train", {}).get("max_steps") or None)
    total = (summary or {}).get("steps", total)
    elapsed = train[-1].get("elapsed_s", 0.0) if train else 0.0
    remaining = elapsed / step * (total - step) if step and total else None
    return {"step": step, "total": total, "elapsed_s": elapsed, "remaining_s": remaining}


def state(launcher: Launcher, folder: Path, with_rows: bool = True) -> dict:
    """Everything a page shows of a run, from its folder (and the app's log of the command)."""
    pid = launcher.pid(folder)
    rec = launcher.record(folder)
    log = tail(launcher.log_path(folder))
    cfg_path = folder / "config.yaml"
    cfg_text = cfg_path.read_text(encoding="utf-8") if cfg_path.is_file() else ""
    cfg = _safe_yaml(cfg_text)
    summary = _json(folder / "summary.json")
    rows = metrics(folder)
    out = {"folder": str(folder), "status": status(folder, pid, rec is not None), "pid": pid, "log": log,
           "config": cfg_text, "summary": summary, "scores": _json(folder / "eval" / "scores.json"),
           "checkpoint": str(checkpoint.latest(folder) or ""), "loss_png": (folder / "loss.png").is_file(),
           **progress(rows, log, cfg, summary)}
    if with_rows:
        out["rows"] = rows
    return out


def _safe_yaml(text: str) -> dict | None:
    try:
        tree = yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return None
    return tree if isinstance(tree, dict) else None


def listing(root: Path) -> list[dict]:
    """The run folders under root (config.yaml beside metrics.jsonl or a checkpoint), newest first, with
    their final numbers."""
    found = []
    if root.is_dir():
        found_cfgs = [c for depth in range(DEPTH) for c in root.glob("*/" * (depth + 1) + "config.yaml")]
        for cfg in sorted(found_cfgs):
            folder = cfg.parent
            if any(part.startswith(".") for part in folder.relative_to(root).parts):
                continue
            if not ((folder / "metrics.jsonl").is_file() or (folder / checkpoint.ROOT).is_dir()):
                continue  # a compare's shared config, or a run refused before its first step
            summary = _json(folder / "summary.json") or {}
            found.append({"folder": str(folder), "name": str(folder.relative_to(root)),
                          "mtime": folder.stat().st_mtime, "steps": summary.get("steps"),
                          "train_loss": summary.get("train_loss"),
                          "eval_loss": (summary.get("eval_after") or {}).get("eval_loss"),
                          "done": bool(summary)})
    return sorted(found, key=lambda r: -r["mtime"])
