"""A time limit on rendering a chat template, which is untrusted code from a model file. Jinja's sandbox stops
attribute escapes and ranges over 100,000 items (an OverflowError, which templates.py reports), not work: two
nested ranges of 100,000 are 10^10 steps, hours of one core."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from types import FrameType

# one render of one conversation; a 10,000-message chat renders in under 2 s (tests/data/test_template_guards.py)
RENDER_SECONDS = 20.0
TEMPLATE_CODE = "<template>"  # the file name of the Python that jinja compiles a template string to


class _Expired(Exception):
    """Raised inside the render once its time is up; time_limit turns it into the caller's error."""


@contextlib.contextmanager
def time_limit(seconds: float, error: Callable[[], Exception]):
    """Stop the block with error() once `seconds` have passed: an alarm signal in the main thread (free while
    it waits); elsewhere (the web app's workers), where signals do not reach, a trace of the template's own
    lines, which look at the clock."""
    try:
        with _alarm(seconds) if _alarm_usable() else _traced(seconds):
            yield
    except _Expired:
        raise error() from None


def _alarm_usable() -> bool:
    # signals reach the main thread only; a timer of the caller's own is left alone
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0)


@contextlib.contextmanager
def _alarm(seconds: float):
    def expire(_signum: int, _frame: FrameType | None) -> None:
        raise _Expired

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def _traced(seconds: float):
    deadline = time.monotonic() + seconds

    def line(_frame: FrameType, _event: str,
             _arg: object) -> Callable:  # every line of the template's code, each loop turn included
        if time.monotonic() > deadline:
            raise _Expired
        return line

    def call(frame: FrameType, _event: str, _arg: object) -> Callable | None:  # other code runs untraced
        return line if frame.f_code.co_filename == TEMPLATE_CODE else None

    old = sys.gettrace()
    sys.settrace(call)
    try:
        yield
    finally:
        sys.settrace(old)
