"""Read alpaca and chat-messages records from JSON, JSONL or a datasets folder into conversations.

Every record becomes an Example: a list of {"role", "content"} messages (optional system first, then
user/assistant turns, ending with an assistant turn) plus `where`, the file and line or record index
that error messages name. A bad record stops the read with a DataError naming file, record and field.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data problem, its message naming the file, the record and the field."""


@dataclass
class Example:
    messages: list[dict[str, str]]  # system? then user/assistant turns, the last one the assistant's
    where: str  # "train.jsonl line 17" or "data.json record 5"


def _raw_records(path: Path, lenient: bool = False) -> Iterator[tuple[str, Any]]:
    """Yield (where, parsed record) from a JSON list, a JSONL file, or a save_to_disk folder. lenient: a
    JSONL line that cannot be read comes as (where, DataError) instead of stopping the read, so that
    data.on_bad_record=skip can pass over it (a JSON list or a folder is read whole either way)."""
    if path.is_dir():
        yield from _disk_records(path)
        return
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror or err}") from None
    data = data.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark (Windows editors write one)
    if path.suffix == ".json" and data.lstrip()[:1] == b"[":
        text = _decode(data, path, None)
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno} column {err.colno}: invalid JSON: {err.msg}") from None
        for i, item in enumerate(items):
            yield f"{path} record {i}", item
        return
    for where, item in _jsonl(data, path):
        if isinstance(item, DataError) and not lenient:
            raise item
        yield where, item


def _jsonl(data: bytes, path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record or the DataError saying why it cannot be read) for each non-blank line."""
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path} line {lineno}"
        try:
            line = _decode(raw, path, f"line {lineno}")
            if not line.strip():
                continue
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            yield where, DataError(f"{where}: invalid JSON at column {err.colno}: {err.msg}")
        except RecursionError:
            yield where, DataError(f"{where}: JSON nested too deeply to read")
        except DataError as err:
            yield where, err


def _decode(data: bytes, path: Path, where: str | None) -> str:
    """UTF-8 text; where=None (a whole file) names the line holding the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if where is None:
            newlines = data.count(b"\n", 0, err.start)
            where = f"line {newlines + 1}"
        raise DataError(f"{path} {where}: not valid UTF-8 (byte {err.start}): save the file as UTF-8") from None


def _disk_records(path: Path) -> Iterator[tuple[str, Any]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as err:  # datasets raises several kinds; all mean "not a saved dataset"
        raise DataError(f"{path}: not a folder written by datasets' save_to_disk ({err})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    for i, item in enumerate(ds):
        yield f"{path} record {i}", item


def _text(rec: dict, key: str, where: str, required: bool, nonempty: bool = False) -> str:
    if key not in rec or rec[key] is None:
        if required:
            raise DataError(f'{where}: field "{key}" is missing; every alpaca record needs it')
        return ""
    value = rec[key]
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{key}" must be a string, got {type(value).__name__}')
    if nonempty and not value.strip():
        raise DataError(f'{where}: field "{key}" is empty; every record needs a non-empty {key}')
    return value


def from_alpaca(rec: dict, where: str) -> Example:
    """instruction (+ "\\n" + input) is the user turn, output the answer; history pairs come first."""
    instruction = _text(rec, "instruction", where, required=True)
    extra = _text(rec, "input", where, required=False)
    output = _text(rec, "output", where, required=True, nonempty=True)
    system = _text(rec, "system", where, required=False)
    prompt = "\n".join(part for part in (instruction, extra) if part)
    if not prompt.strip():
        raise DataError(f'{where}: fields "instruction" and "input" are both empty; the prompt needs text')
    messages = [{"role": "system", "content": system}] if system else []
    history = rec.get("history")
    if history is None:
        history = []
    if not isinstance(history, list):
        raise DataError(f'{where}: field "history" must be a list of [user, assistant] pairs')
    for i, pair in enumerate(history):
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        if not ok:
            raise DataError(f'{where}: field "history[{i}]" must be a [user, assistant] pair of strings')
        if not pair[1].strip():
            raise DataError(f'{where}: field "history[{i}][1]" is empty; every assistant turn needs text')
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Example(messages, where)


def from_messages(rec: dict, where: str) -> Example:
    """Chat records: roles system (first only), then user and assistant alternating, ending with assistant."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f'{where}: field "messages" must be a non-empty list of {{"role", "content"}} objects')
    out = []
    for i, m in enumerate(msgs):
        field = f"messages[{i}]"
        if not isinstance(m, dict):
            raise DataError(f'{where}: field "{field}" must be an object with "role" and "content"')
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f'{where}: field "{field}.role" is {role!r}; expected one of {", ".join(ROLES)}')
        if not isinstance(content, str):
            raise DataError(f'{where}: field "{field}.content" must be a string, got {type(content).__name__}')
        if role == "system" and i != 0:
            raise DataError(f'{where}: field "{field}.role": a system message may only come first')
        expected = "user" if (len(out) - (out[0]["role"] == "system" if out else 0)) % 2 == 0 else "assistant"
        if role != "system" and role != expected:
            raise DataError(f'{where}: field "{field}.role" is {role!r}; turns must alternate user/assistant '
                            f"starting with user (expected {expected!r})")
        if role == "assistant" and not content.strip():
            raise DataError(f'{where}: field "{field}.content" is empty; every assistant turn needs text')
        out.append({"role": role, "content": content})
    if out[-1]["role"] != "assistant":
        raise DataError(f'{where}: field "messages[{len(out) - 1}].role": the last message must be the '
                        "assistant's answer")
    return Example(out, where)


def parse(rec: Any, where: str, fmt: str = "auto") -> Example:
    """One raw record to an Example, by format (auto looks for "messages", then "instruction")."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if fmt == "auto":
        fmt = "messages" if "messages" in rec else "alpaca" if ("instruction" in rec or "output" in rec) else ""
        if not fmt:
            raise DataError(f'{where}: neither field "messages" (chat) nor "instruction"/"output" (alpaca) '
                            f"found; fields present: {', '.join(map(str, rec)) or 'none'}")
    return from_messages(rec, where) if fmt == "messages" else from_alpaca(rec, where)


def read(path: str | Path, fmt: str = "auto", limit: int = 0) -> list[Example]:
    """All records of a file or folder; an empty source is an error."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    examples = []
    for where, rec in _raw_records(p):
        examples.append(parse(rec, where, fmt))
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{p}: no records found")
    return examples


def read_prompts(path: str | Path) -> tuple[list[Example], list[Any]]:
    """Prompts for generation (alpaca records, output optional, or messages ending with a user turn),
    with the raw records so outputs can carry them along."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: prompts file not found")
    out, raws = [], []
    for where, rec in _raw_records(p):
        raws.append(rec)
        if isinstance(rec, dict) and "messages" in rec and isinstance(rec["messages"], list):
            rec = dict(rec, messages=list(rec["messages"]) + [{"role": "assistant", "content": "-"}])
            prev = rec["messages"][-2] if len(rec["messages"]) >= 2 else None
            if isinstance(prev, dict) and prev.get("role") == "assistant":
                raise DataError(f'{where}: field "messages": a prompt must end with a user message')
        elif isinstance(rec, dict):
            rec = dict(rec, output="-")
        ex = parse(rec, where)
        ex.messages = ex.messages[:-1]
        out.append(ex)
    if not out:
        raise DataError(f"{p}: no prompts found")
    return out, raws
