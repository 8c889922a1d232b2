"""A run folder's safety: what `slimtune train` may delete there, and who may write there at a time.

    <output_dir>/.slimtune-run.json   written when a run first writes to the folder: the names slimtune
                                      writes at its top (what --overwrite may remove), and the user's files
                                      that were there then (never removed, whatever their names)
    <output_dir>/.slimtune-lock       the PID of the process training here, flock'ed while it runs

A folder without the manifest is not slimtune's own: nothing in it is ever deleted. Entries are renamed
to .slimtune-old-* before they are deleted, so a kill mid-delete leaves a name the next run removes,
never a half-deleted checkpoint that looks complete.
"""
from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from ..config import ConfigError

MANIFEST, LOCK, PROBE, OLD = ".slimtune-run.json", ".slimtune-lock", ".slimtune-probe", ".slimtune-old-"
# everything `slimtune train` writes at the top of its output folder (peft's save_pretrained adds README.md)
WRITES = ["config.yaml", "metrics.jsonl", "skipped_records.jsonl", "checkpoints", "eval", "adapter_config.json",
          "adapter_model.safetensors", "slimtune_parts.safetensors", "README.md", "events.out.tfevents.*",
          "loss.png", "summary.json", "profile.txt", "rewards.json",
          "reference_logps.safetensors", "reference_logps.safetensors.tmp-*",
          MANIFEST, MANIFEST + ".tmp-*", OLD + "*"]
# a fresh run's folder before its first step: a run stopped there (a failed check, a kill) left nothing else
# (a preference run's precomputed reference is written before the first step too)
STARTED = {MANIFEST, "config.yaml", "reference_logps.safetensors"}


class RunFolderError(ConfigError):
    """train.output_dir cannot be used as asked: another process holds it, it can't be written, or it
    holds files slimtune did not write."""


def probe(out: Path) -> list[Path]:
    """Create the folder if needed and write + remove a small file in it, so a read-only folder or a
    full disk stops the run in one line before any slow work. Returns the folders it created."""
    made = [p for p in [out, *out.parents] if not p.exists()][::-1]
    path = out / PROBE
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"\0" * 4096)  # a disk with no free block fails here, as a checkpoint would
            os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink()
    except OSError as err:
        with contextlib.suppress(OSError):  # a probe half-written to a full disk
            path.unlink(missing_ok=True)
        remove_if_empty(made)
        raise RunFolderError(f"train.output_dir: cannot write to {err.filename or out}: {_cause(err)}; "
                             "choose a folder you can write to (train.output_dir=...)" +
                             (", or free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "")) from err
    return made


def _cause(err: OSError) -> str:
    return f"{err.strerror or err} ({errno.errorcode.get(err.errno, err.errno)})"


def environment_error(err: OSError, out: Path) -> RunFolderError | None:
    """One line for an OSError the machine caused mid-run (a full disk, a folder made read-only), else None."""
    inside = err.filename is None or Path(out).resolve() in Path(str(err.filename)).resolve().parents
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or (inside and err.errno in (errno.EACCES, errno.EPERM)):
        return RunFolderError(f"writing {err.filename or out} failed: {_cause(err)}; the newest complete checkpoint "
                              "is intact: free space or fix the folder, then `slimtune train CONFIG --resume`")
    return None


def remove_if_empty(made: list[Path]) -> None:
    """Remove the folders probe() created (deepest first) that are still empty: a run that stopped
    before writing anything leaves no folder behind."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:  # not empty (the run wrote there) or already gone
            return


def entries(out: Path) -> set[str]:
    """Names at the top of the folder, without the lock and probe of the process looking."""
    return {p.name for p in out.iterdir()} - {LOCK, PROBE} if out.is_dir() else set()


def read_manifest(out: Path) -> dict | None:
    path = out / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunFolderError(f"{path}: unreadable ({err}); it marks the folder as a slimtune run: restore it, "
                             "or choose another train.output_dir") from None
    if not isinstance(data, dict) or not isinstance(data.get("writes"), list):
        raise RunFolderError(f"{path}: not a slimtune run manifest (no 'writes' list); choose another "
                             "train.output_dir")
    return data


def write_manifest(out: Path, created_folder: bool, user_files: set[str]) -> None:
    """Mark the folder as a run: what slimtune writes here, and which files were the user's."""
    tree = {"slimtune_run": 1, "created_folder": created_folder, "writes": WRITES, "user_files": sorted(user_files)}
    tmp = out / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(tree, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST)


def own(out: Path, manifest: dict) -> list[str]:
    """The names in the folder that slimtune wrote there, per its manifest. Only names this slimtune
    writes count: a manifest edited (or shipped in a downloaded folder) to say "*" deletes nothing more."""
    keep = set(manifest.get("user_files") or [])
    patterns = [p for p in manifest["writes"] if p in WRITES]
    return sorted(n for n in entries(out) if n not in keep and any(fnmatch.fnmatchcase(n, p) for p in patterns))


def doomed(out: Path, manifest: dict, protect: list[Path]) -> list[str]:
    """What a fresh start removes: what slimtune wrote, not the manifest (the caller rewrites it). An entry
    that is or holds a path this run reads (the working directory, the data) is an error; the config file
    itself stays, as the run writes its resolved copy there."""
    guard = [Path(p).resolve() for p in protect]
    names = [n for n in own(out, manifest) if n != MANIFEST]
    for name in names:
        path = (out / name).resolve()
        held = [g for g in guard if path in g.parents or (g == path and name != "config.yaml")]
        if held:
            raise RunFolderError(f"train.output_dir: --overwrite would remove {out / name}, which is or holds "
                                 f"{held[0]} that this run reads; move it out of the run folder first")
    return [n for n in names if (out / n).resolve() not in guard]  # a config.yaml this run was started from


def remove_own(out: Path, manifest: dict, protect: list[Path]) -> list[str]:
    """Delete what `doomed` lists; returns the names removed."""
    names = doomed(out, manifest, protect)
    for name in names:
        aside = out / name if name.startswith(OLD) else out / f"{OLD}{os.getpid()}-{name}"
        os.rename(out / name, aside)  # atomic: a kill leaves a .slimtune-old-* name, not half of a checkpoint
    for name in entries(out):
        if name.startswith(OLD):
            _delete(out / name)
    return names


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class Lock:
    """One process per run folder: an flock on .slimtune-lock holding the PID. The kernel drops the flock
    when its process dies, however it dies, so a lock left by a killed run is taken over (with a line
    saying so) and a live one is refused, naming its PID."""

    def __init__(self, out: Path, log: Callable[[str], None] = print) -> None:
        self.path, self.log, self.fd = Path(out) / LOCK, log, None

    def __enter__(self) -> Lock:
        import fcntl

        for _ in range(5):  # the holder may unlink the file between our open and flock: open the new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunFolderError(f"train.output_dir: {self.path.parent} is in use by another slimtune process "
                                     f"(PID {_pid(self.path) or 'unknown'}, in {self.path}); wait for it to finish "
                                     "or stop it, or choose another folder") from None
            if self.path.exists() and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)
        else:  # pragma: no cover - five races in a row
            raise RunFolderError(f"train.output_dir: could not take {self.path}; another process keeps replacing it")
        self.fd, old = fd, _pid(self.path)
        if old not in (None, os.getpid()):
            self.log(f"{self.path.parent}: took over the lock of PID {old}, which is no longer running "
                     "(a run killed there)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)  # while still held: no other process can be between open and flock
        os.close(self.fd)
        self.fd = None


def _pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def adopt(out: Path) -> None:
    """Mark a run folder written before manifests existed, on --resume: its files with slimtune's names
    are the run's, every other one the user's."""
    if read_manifest(out) is None:
        user = {n for n in entries(out) if not any(fnmatch.fnmatchcase(n, p) for p in WRITES)}
        write_manifest(out, False, user)


def holder(out: Path) -> int | None:
    """The PID of the process training in `out` now (it holds the lock), else None; for a watcher such as the
    web app, which must not take the lock itself."""
    import fcntl

    path = Path(out) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return _pid(path)
    finally:
        os.close(fd)
