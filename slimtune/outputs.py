"""Where a command may write: never over what it reads. One rule for every path slimtune writes (train's
output_dir, merge --output, export --output and its Modelfile, generate --output, chat --save, eval --output,
compare --output), checked before anything loads:

- not the base model: the path is not, does not hold, and is not inside the base model's folder or file
  (a merge written into its own base made every later load of the run apply the adapter twice);
- not the data: the path is not an input data file (or save_to_disk folder), and neither is any file a
  folder output gets (eval's scores.json...). An output folder may hold the data: what is written there has
  its own names, and train removes only the files it listed as its own (merge, whose --overwrite replaces
  its folder whole, holds the data to the base model's rule through `reads`).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .assets import embedded_folder
from .errors import ExistingFileError
from .models import EMBEDDED


def model_location(path: str | Path) -> Path:
    """Where a model.path is on this machine, resolved: "embedded" is its converted folder (not converted here)."""
    return (embedded_folder() if str(path) == EMBEDDED else Path(path).expanduser()).resolve()


def _overlap(a: Path, b: Path) -> bool:
    """a is b, holds it, or is inside it."""
    return a == b or a in b.parents or b in a.parents


def check(out: str | Path, flag: str, base: str | Path | None = None, data: Iterable[str | Path | None] = (),
          files: Iterable[str] = (), reads: Iterable[tuple[str, str | Path | None]] = ()) -> None:
    """Refuse `out` (named `flag` in the message, e.g. "export --output") where writing it could overwrite what
    the command reads. base: the model.path it reads; data: input data paths (None and "" skipped); files:
    the names written inside a folder output; reads: more (what, path) pairs held to the base's rule."""
    where = Path(out).expanduser().resolve()
    held = ([("the base model", model_location(base))] if base else []) + \
        [(what, Path(p).expanduser().resolve()) for what, p in reads if p]
    for what, path in held:
        if _overlap(where, path):
            raise ExistingFileError(f"{flag} {out} is, holds, or is inside {what} {path}, which this command reads: "
                                    f"give another {flag.split()[-1]}")
    written = [where, *(where / name for name in files)]
    for p in (Path(d).expanduser().resolve() for d in data if d):
        if p in written:
            part = "" if p == where else f" (its {p.name})"
            raise ExistingFileError(f"{flag} {out}{part} is the input data {p}, which this command reads: give "
                                    f"another {flag.split()[-1]}")
