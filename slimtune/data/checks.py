"""Guards every record passes on its way in: what Python's json lets through but no command can use.

A field holding a lone surrogate (a \\ud800-style escape) or an integer of more digits than Python
converts is an error naming file, record and field. Records that are readable but odd (a repeated JSON
key, NaN/Infinity literals, NUL or other control characters, keys slimtune does not read, empty user
turns) are counted in Notes, which reports one line per kind naming the first record.
"""
from __future__ import annotations

import difflib
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from ..errors import SlimtuneError

SURROGATE = re.compile("[\ud800-\udfff]")
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 controls and DEL, but tab, newline, CR

WHAT = {
    "duplicate": "a repeated JSON key (the last value is used)",
    "unknown": "keys slimtune does not read",
    "nonfinite": "NaN or Infinity, which standard JSON does not allow",
    "control": "NUL or other control characters in text",
    "empty_user": "an empty user turn",
}


class DataError(SlimtuneError, ValueError):
    """A data problem, its message naming the file, the record and the field."""


class HugeInt:
    """An integer literal longer than Python converts (4,300 digits): `scan` names its field."""

    def __init__(self, digits: int):
        self.digits = digits

    def __repr__(self) -> str:
        return f"<integer of {self.digits} digits>"


class DupDict(dict):
    """A JSON object that repeated a key (json keeps the last value): `scan` counts it."""
    dups: list[str]


class Notes:
    """Readable but odd records: each kind counted, with the first record and field."""

    def __init__(self, path: Path, unknown_keys: bool = True):
        self.path, self.counts, self.first = path, Counter(), {}
        self.track_unknown = unknown_keys  # prompts files carry their other keys into the outputs
        self.unknown_keys: Counter = Counter()
        self.hints: dict[str, str] = {}

    def add(self, kind: str, where: str, detail: str = "") -> None:
        self.counts[kind] += 1
        where = where.removeprefix(f"{self.path} ")  # the line says the file once
        self.first.setdefault(kind, where + (f', field "{detail}"' if detail else ""))

    def unknown(self, where: str, keys: list[str], known: set[str]) -> None:
        if not self.track_unknown:
            return
        self.add("unknown", where, keys[0])
        self.unknown_keys.update(keys)
        for k in keys:
            close = difflib.get_close_matches(k, sorted(known), n=1)
            if close:
                self.hints.setdefault(k, close[0])

    def lines(self) -> list[str]:
        out = []
        for kind in (k for k in WHAT if k in self.counts):
            n = self.counts[kind]
            line = f"warning: {self.path}: {n} record{'s' * (n != 1)} with {WHAT[kind]}; first: {self.first[kind]}"
            if kind == "unknown":
                keys = [f'"{k}"' + (f' (did you mean "{self.hints[k]}"?)' if k in self.hints else "")
                        for k, _ in self.unknown_keys.most_common(5)]
                line += f"; keys: {', '.join(keys)}"
            out.append(line)
        return out

    def report(self, log) -> None:
        for line in self.lines():
            log(line)


def _name(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def scan(rec: Any, where: str, notes: Notes | None = None) -> None:
    """Raise a DataError for the first field no command can use; note the odd ones. (A loop, not
    recursion: a record may nest as deep as json allows.)"""
    stack = [("", rec)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, str):
            if SURROGATE.search(value):
                raise DataError(f'{where}: field "{name or "(record)"}" holds an unpaired surrogate (a \\ud800-style '
                                "escape), which is not text; fix or remove that character")
            if notes is not None and CONTROL.search(value):
                notes.add("control", where, name)
        elif isinstance(value, HugeInt):
            raise DataError(f'{where}: field "{name or "(record)"}" holds an integer of {value.digits} digits, more '
                            f"than Python reads ({sys.get_int_max_str_digits()}); write it as a string or remove it")
        elif isinstance(value, float) and not math.isfinite(value):
            if notes is not None:
                notes.add("nonfinite", where, name)
        elif isinstance(value, (dict, list)):
            if isinstance(value, DupDict) and notes is not None:
                notes.add("duplicate", where, _name(name, value.dups[0]))
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack += reversed([(_name(name, k), v) for k, v in items])


def skip_entry(where: str, reason: str, rec: Any) -> dict:
    """A skipped_records.jsonl entry: where (and file, line or record index apart), why, and the record
    itself (a line that is not JSON has none: its reason says so)."""
    entry = {"where": where, "reason": reason, "record": None if isinstance(rec, DataError) else rec}
    parts = where.rsplit(" ", 2)
    if len(parts) == 3 and parts[1] in ("line", "record") and parts[2].isdigit():
        entry.update(file=parts[0], **{parts[1]: int(parts[2])})
    return entry
