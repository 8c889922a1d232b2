"""Which paths the web app may read and start runs in: the working directory it was started in and the runs
directory, nothing else. Anyone who can reach the port can type a path into a form; a path outside these roots
(or a link that leads outside) is refused, so the app cannot be used to read ~/.ssh or write to /etc."""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.checks import SURROGATE
from ..errors import SlimtuneError

LOCAL = ("127.0.0.1", "localhost", "::1")  # loopback names: the hosts the app binds and answers by default
# model.path values that are not paths: the model shipped in a PyPI package
NOT_PATHS = ("embedded",)


class PathRefused(SlimtuneError, PermissionError):
    """A path outside the web app's allowed roots (the server answers 403)."""


class NotAPath(SlimtuneError, ValueError):
    """Text no file name can hold (a NUL byte, an unpaired surrogate) or a path the OS cannot look up (~ of no
    user, a link loop, a name too long): the server answers 400."""


@dataclass(frozen=True)
class Roots:
    work: Path  # the working directory `slimtune ui` started in: relative paths are read from here
    runs: Path  # where the app's runs go (and the Runs page lists them)

    @classmethod
    def at(cls, work: str | Path, runs: str | Path | None = None) -> Roots:
        work = Path(work).resolve()
        return cls(work, (work / (runs or "runs")).resolve())

    @property
    def ui(self) -> Path:
        """The app's own files (the YAML of each run it started, the run's console log)."""
        return self.runs / ".slimtune-ui"

    def check(self, text: str | Path, field: str = "path") -> Path:
        """The absolute, resolved path; PathRefused when it lies outside both roots."""
        if not str(text).strip():
            raise PathRefused(f"{field}: empty; give a path under {self.work}")
        try:
            p = Path(_path_text(str(text), field)).expanduser()
            p = (p if p.is_absolute() else self.work / p).resolve()  # links followed: a link out is refused too
            _stat(p)
        except (RuntimeError, OSError) as err:  # ~name of no user here; links that lead back to themselves
            shown = str(text) if len(str(text)) <= 200 else f"{str(text)[:200]}..."
            raise NotAPath(f"{field}: {shown}: {str(err).rstrip('.')}; give a path under {self.work}") from None
        if not any(p == root or root in p.parents for root in (self.work, self.runs)):
            raise PathRefused(f"{field}: {text} is outside the folders this app may use ({self.work} and "
                              f"{self.runs}); copy the file there, or start `slimtune ui` in a folder above it")
        return p

    def model(self, text: str, field: str = "model.path") -> str:
        """model.path as given when it names no file ('embedded'), else the checked absolute path."""
        return text if text in NOT_PATHS else str(self.check(text, field))


def _path_text(text: str, field: str) -> str:
    """The text, or NotAPath when it holds what no file name can (the OS refuses it with a ValueError)."""
    bad = "a NUL byte" if "\x00" in text else "an unpaired surrogate (a \\ud800-style escape)" \
        if SURROGATE.search(text) else None
    if bad:
        raise NotAPath(f"{field}: {text!r} holds {bad}, which no file name can; give a path under the working "
                       "directory")
    return text


def _stat(p: Path) -> None:
    """OSError for a path the OS refuses to look up (a name longer than it allows, which pathlib's is_dir()
    and is_file() raise rather than answer False; a link loop, where resolve() did not raise); a path that is
    not there is fine."""
    try:
        os.stat(p)
    except OSError as err:
        if err.errno in (errno.ENAMETOOLONG, errno.ELOOP):
            raise OSError(f"{os.strerror(err.errno).lower()} on this system") from None
