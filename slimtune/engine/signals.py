"""SIGINT, SIGTERM and SIGHUP caught for the length of a `with` block, the previous handlers put back after.

Training (checkpoint.StopOnSignal: save at the next step boundary) and `slimtune compare` (compare/child.Forward:
pass the signal on to the running child) differ only in what a signal does; the handlers' installing and
restoring is this one class. Imports nothing heavy: compare's parent process uses it too."""
from __future__ import annotations

import errno
import os
import signal
import threading

try:
    import termios
except ImportError:  # Windows: no terminals to hang up (and no SIGHUP)
    termios = None


class SignalScope:
    """Subclasses define _handle(signum, frame); _restore() steps aside early (a second signal then acts
    as it would without the scope)."""

    # SIGHUP (the terminal or ssh session closed) as SIGTERM: its default would end the process at once and
    # lose every step since the last checkpoint; Windows has no SIGHUP
    SIGNALS = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())

    def __init__(self):
        self._old: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        if signum == getattr(signal, "SIGHUP", None):
            leave_a_closed_terminal()
        self._handle(signum, frame)

    def _handle(self, signum, frame) -> None:  # pragma: no cover - always overridden
        raise NotImplementedError

    def _restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def __exit__(self, *exc) -> None:
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
