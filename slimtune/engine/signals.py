"""SIGINT and SIGTERM caught for the length of a `with` block, the previous handlers put back after.

Training (checkpoint.StopOnSignal: save at the next step boundary) and `slimtune compare` (compare/child.Forward:
pass the signal on to the running child) differ only in what a signal does; the handlers' installing and
restoring is this one class; die_with_parent is the other end of a signal: compare's child stopped as its
parent dies. Imports nothing heavy: compare's parent process uses it too."""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PARENT_ENV = "SLIMTUNE_DIE_WITH"  # the PID of the compare whose child this is
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """SIGTERM to this process, once, when its compare dies, however it dies (SIGKILL too), so a row's
    training saves its checkpoint and stops instead of training on orphaned (Linux; elsewhere compare's
    record of the child lets the next compare stop it). The kernel sends the parent-death signal again each
    time the child is handed to another thread of the dying parent, and a second SIGTERM stops training
    mid-save: so SIGHUP arrives, and only the first is passed on as SIGTERM. A compare that died before
    this ran is seen by the PID."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent or not sys.platform.startswith("linux"):
        return
    first = []

    def hung_up(signum, frame) -> None:
        if not first:
            first.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGHUP, hung_up)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGHUP, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:
        os.kill(os.getpid(), signal.SIGTERM)


class SignalScope:
    """Subclasses define _handle(signum, frame); _restore() steps aside early (a second signal then acts
    as it would without the scope)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc) -> None:
        self._restore()
