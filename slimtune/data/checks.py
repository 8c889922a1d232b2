"""Guards every record passes on its way in: what Python's json lets through but no command can use.

A field holding a lone surrogate (a \\ud800-style escape) or an integer of more digits than Python
converts is an error naming file, record and field. Records that are readable but odd (a repeated JSON
key, NaN/Infinity literals, NUL or other control characters, Unicode noncharacters, keys slimtune does not
read, empty user turns, whitespace-only fields, empty system messages, a file mixing formats) are counted in
Notes, which reports one line per kind naming the first record.
"""
from __future__ import annotations

import difflib
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from ..errors import SlimtuneError

SURROGATE = re.compile("[\ud800-\udfff]")
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 controls and DEL, but tab, newline, CR
# Unicode's 66 noncharacters: U+FDD0-U+FDEF and the last two code points of each plane (U+FFFE, U+FFFF, ...).
# Counted, not refused: they are valid in interchange (Corrigendum #9) and encode and tokenize like any
# character, so the record is usable, but in training text they are almost always damage (U+FFFE is a
# byte-order mark read in the wrong byte order).
NONCHAR = re.compile("[\ufdd0-\ufdef" + "".join(chr(p << 16 | 0xFFFE) + chr(p << 16 | 0xFFFF) for p in range(17)) + "]")

WHAT = {
    "duplicate": "a repeated JSON key (the last value is used)",
    "unknown": "keys slimtune does not read",
    "nonfinite": "NaN or Infinity, which standard JSON does not allow",
    "control": "NUL or other control characters in text",
    "nonchar": "Unicode noncharacters (like U+FFFE, a byte-order mark read in the wrong byte order) in text",
    "empty_user": "an empty user turn",
    "blank": "a whitespace-only instruction, input or system, read as empty",
    "empty_system": "an empty system message, left out (data.system applies as without one)",
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
        self.last: dict[str, str] = {}  # kind: the record that added it last
        self.formats: Counter = Counter()  # records read per format, and the first of each
        self.format_first: dict[str, str] = {}

    def add(self, kind: str, where: str, detail: str = "") -> None:
        if self.last.get(kind) == where:  # a record with two such fields is still one record
            return
        self.last[kind] = where
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

    def format(self, fmt: str, where: str) -> None:
        """A record read as `fmt`: a file whose records come in more than one format is reported."""
        self.formats[fmt] += 1
        self.format_first.setdefault(fmt, where.removeprefix(f"{self.path} "))

    def _mixed(self) -> str:
        """Records of two formats are each clear, but a file holding both is often an accident: name the
        first record of the rarer format (on a tie, the one met last)."""
        rare = min(reversed(self.formats), key=self.formats.__getitem__)
        n, rest = self.formats[rare], [f for f in self.formats if f != rare]
        other = self.formats.total() - n
        return (f"warning: {self.path}: {n} record{'s' * (n != 1)} in {rare} format, the other {other} in "
                f"{' and '.join(rest)}; first: {self.format_first[rare]}")

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
        if len(self.formats) > 1:
            out.append(self._mixed())
        return out

    def report(self, log: Callable[[str], None]) -> None:
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
            if notes is not None and NONCHAR.search(value):
                notes.add("nonchar", where, name)
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
