"""A time limit on rendering a chat template, which is untrusted code from a model file. Jinja's sandbox stops
attribute escapes and ranges over 100,000 items (an OverflowError, which templates.py reports), not work: two
nested ranges of 100,000 are 10^10 steps, hours of one core."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

# one render of one conversation; a 10,000-message chat renders in under 2 s (tests/data/test_template_guards.py)
RENDER_SECONDS = 20.0


class _Expired(Exception):
    """Raised inside the render by the alarm; time_limit turns it into the caller's error."""


@contextlib.contextmanager
def time_limit(seconds: float, error: Callable[[], Exception]):
    """Stop the block with error() once `seconds` have passed. A timer needs the main thread (signals reach
    only it) and no timer of the caller's own: elsewhere the block runs unbounded, as before."""
    usable = (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
              and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    if not usable:
        yield
        return

    def expire(_signum, _frame):
        raise _Expired

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Expired:
        raise error() from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
