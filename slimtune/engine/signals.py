"""SIGINT and SIGTERM caught for the length of a `with` block, the previous handlers put back after.

Training (checkpoint.StopOnSignal: save at the next step boundary) and `slimtune compare` (compare/child.Forward:
pass the signal on to the running child) differ only in what a signal does; the handlers' installing and
restoring is this one class. Imports nothing heavy: compare's parent process uses it too."""
from __future__ import annotations

import signal
import threading


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
