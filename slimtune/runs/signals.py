"""SIGINT, SIGTERM and SIGHUP caught for the length of a `with` block, the previous handlers put back after.

Training (checkpoint.StopOnSignal: save at the next step boundary) and `slimtune compare` (compare/child.Forward:
pass the signal on to the running child) differ only in what a signal does; the handlers' installing and
restoring is this one class; die_with_parent is the other end of a signal: compare's child stopped as its
parent dies. Imports nothing heavy: compare's parent process uses it too."""
from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
import threading
from types import FrameType
from typing import Any, Self

try:
    import termios
except ImportError:  # Windows: no terminals to hang up (and no SIGHUP)
    termios = None

PARENT_ENV = "SLIMTUNE_DIE_WITH"  # the PID of the compare whose child this is
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """SIGTERM to this process, once, when its compare dies, however it dies (SIGKILL too), so a row's
    training saves its checkpoint and stops instead of training on orphaned (Linux; elsewhere compare's
    record of the child lets the next compare stop it). The kernel sends the parent-death signal again each
    time the child is handed to another thread of the dying parent, and a second SIGTERM stops training
    mid-save: so SIGUSR1 arrives (a signal no SignalScope handles: SIGHUP is training's "terminal closed"),
    and only the first is passed on as SIGTERM. A compare that died before this ran is seen by the PID."""
    parent = os.environ.pop(PARENT_ENV, "")
    if not parent or not sys.platform.startswith("linux"):
        return
    first = []

    def orphaned(signum: int, frame: FrameType | None) -> None:
        if not first:
            first.append(signum)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGUSR1, orphaned)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != parent:
        os.kill(os.getpid(), signal.SIGTERM)


class SignalScope:
    """Subclasses define _handle(signum, frame); _restore() steps aside early (a second signal then acts
    as it would without the scope)."""

    # SIGHUP (the terminal or ssh session closed) as SIGTERM: its default would end the process at once and
    # lose every step since the last checkpoint; Windows has no SIGHUP
    SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())

    def __init__(self) -> None:
        self._old: dict[int, Any] = {}

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            leave_a_closed_terminal()
        self._handle(signum, frame)

    def _handle(self, signum: int, frame: FrameType | None) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc: object) -> None:
        self._restore()


def leave_a_closed_terminal() -> None:
    """stdout and stderr that were a terminal now closed point at os.devnull: a hung-up terminal fails every
    write (EIO), and the next line printed would end the run in a traceback before its checkpoint. A live
    terminal (`kill -HUP`), a pipe or a file stays as it is."""
    for fd in (1, 2):
        try:
            if termios is not None:
                termios.tcgetattr(fd)
        except termios.error as err:
            if err.args[0] == errno.EIO:  # a tty, hung up; any other stream answers ENOTTY
                null = os.open(os.devnull, os.O_WRONLY)
                os.dup2(null, fd)
                os.close(null)
