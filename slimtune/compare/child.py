"""One measured child process: a `slimtune` command run in its own process, so each method's peak memory
is its own. The child, run as `python -m slimtune.measured` (outside this package, so that it loads no
more than the command it runs), writes its peak RSS (VmHWM of /proc/self/status)
and peak GPU memory to a JSON file as it exits. Its rusage is only the fallback (a child killed before it
could write): getrusage(RUSAGE_CHILDREN) is the largest of all children so far, and even os.wait4's
per-child ru_maxrss counts the parent's RSS at fork time (Linux carries the pre-exec peak over exec),
so a small child of a large parent would report the parent's size (measured: 0.35 GiB for `--help`)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine.signals import SignalScope

@dataclass
class Outcome:
    rc: int
    seconds: float  # wall time of the whole child, start-up and model load included
    rss_gib: float  # the child's peak resident memory
    gpu: dict  # peak_allocated_gib / peak_reserved_gib when the child used CUDA, else {}
    interrupted: bool  # compare itself was asked to stop while this child ran

    def failure(self, log_path: Path) -> str:
        """The last non-blank line of the child's log: its error (`slimtune train: error: ...`, or a
        traceback's last line such as torch.OutOfMemoryError)."""
        lines = [x.strip() for x in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if x.strip()]
        return lines[-1] if lines else f"exit status {self.rc} with an empty log ({log_path})"


class Forward(SignalScope):
    """While a child runs, SIGINT/SIGTERM/SIGHUP sent to compare go to the child once (it saves a checkpoint and
    stops: engine/checkpoint.StopOnSignal) and compare stops after it, instead of leaving it orphaned.
    The child runs in its own session, so a Ctrl-C in the terminal reaches it only through here."""

    def __init__(self):
        super().__init__()
        self.proc, self.requested = None, None

    def _handle(self, signum, frame) -> None:
        first = self.requested is None
        self.requested = signal.Signals(signum).name
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum if first else signal.SIGKILL)  # a second signal stops at once


def run(args: list[str], log_path: Path, peak_path: Path, forward: Forward) -> Outcome:
    """`python -m slimtune.measured PEAK ARGS...` with stdout and stderr in log_path."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    peak_path.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "slimtune.measured", str(peak_path), *args]
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        forward.proc = proc
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # retried by Python when a signal handler returns
        finally:
            forward.proc = None
    proc.returncode = os.waitstatus_to_exitcode(status)  # wait4 reaped it: Popen must not wait again
    peaks = json.loads(peak_path.read_text()) if peak_path.is_file() else {}
    rss = peaks.pop("rss_gib", None) or usage.ru_maxrss / 2**20  # ru_maxrss: KiB on Linux
    return Outcome(proc.returncode, time.perf_counter() - start, rss, peaks, forward.requested is not None)
