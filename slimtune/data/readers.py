"""Read alpaca, chat-messages and ShareGPT records from JSON, JSONL or a datasets folder into conversations.

Every record becomes an Example: a list of {"role", "content"} messages (optional system first, then
user/assistant turns, ending with an assistant turn) plus `where`, the file and line or record index
that error messages name. A bad record stops the read with a DataError naming file, record and field.

Every command reads through `read` (train, inspect, estimate, eval; generate through `read_prompts`), so
each gets the same guards: JSON that Python cannot hold (5,000-digit integers, deep nesting) and text that
is not Unicode (lone surrogates) are errors naming the record, and odd but readable records (duplicate
keys, unknown keys, NaN literals, control characters, empty user turns) are counted and reported.
A whitespace-only field reads as empty and an empty system message is left out (both counted); a null
(a datasets column that a row lacks) is a missing field.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from .checks import DataError, DupDict, HugeInt, Notes, scan, skip_entry

ROLES = ("system", "user", "assistant")
ALPACA = ("instruction", "input", "output", "system", "history")
KNOWN = {"alpaca": set(ALPACA), "messages": {"messages", "system"}, "sharegpt": {"conversations", "system"}}
# ShareGPT's role names (LLaMA-Factory's tags and the OpenAI ones); observation and function_call (tool
# results and tool calls) have no place in a system/user/assistant conversation, so they are refused.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}


@dataclass
class Example:
    messages: list[dict[str, str]]  # system? then user/assistant turns, the last one the assistant's
    where: str  # "train.jsonl line 17" or "data.json record 5"
    raw: Any = None  # the record as read, for skipped_records.jsonl


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
            items = _loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno} column {err.colno}: invalid JSON: {err.msg}") from None
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to read") from None
        for i, item in enumerate(items):
            yield f"{path} record {i}", item
        return
    for where, item in _jsonl(data, path):
        if isinstance(item, DataError) and not lenient:
            raise item
        yield where, item


def _parse_int(text: str) -> Any:
    try:
        return int(text)
    except ValueError:  # Python refuses to convert huge digit strings (CVE-2020-10735's limit)
        return HugeInt(len(text.lstrip("-")))


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        out = DupDict(out)
        seen: set[str] = set()
        out.dups = [k for k, _ in pairs if k in seen or seen.add(k)]
    return out


def _loads(text: str) -> Any:
    return json.loads(text, parse_int=_parse_int, object_pairs_hook=_pairs)


def _jsonl(data: bytes, path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record or the DataError saying why it cannot be read) for each non-blank line."""
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{path} line {lineno}"
        try:
            line = _decode(raw, path, f"line {lineno}")
            if not line.strip():
                continue
            yield where, _loads(line)
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
    return value if value.strip() else ""  # whitespace only (NBSP too) reads as empty; _note counts it


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
    return Example(messages, where, rec)


def _turn(m: Any, field: str, where: str, keys: tuple[str, str], roles: dict[str, str]) -> dict[str, str]:
    """One {"role", "content"} message from a chat item whose role and text sit under `keys`."""
    rkey, ckey = keys
    if not isinstance(m, dict):
        raise DataError(f'{where}: field "{field}" must be an object with "{rkey}" and "{ckey}"')
    role, content = m.get(rkey), m.get(ckey)
    if not isinstance(role, str) or role not in roles:
        raise DataError(f'{where}: field "{field}.{rkey}" is {role!r}; expected one of {", ".join(roles)}')
    if content is None:  # absent, or null in a datasets row that lacks it
        raise DataError(f'{where}: field "{field}.{ckey}" is missing; every message needs its text')
    if not isinstance(content, str):
        raise DataError(f'{where}: field "{field}.{ckey}" must be a string, got {type(content).__name__}')
    return {"role": roles[role], "content": content}


def _conversation(items: Any, where: str, name: str, keys: tuple[str, str], roles: dict[str, str]) -> list[dict]:
    """Checked messages: system (first only), then user and assistant alternating, ending with assistant."""
    if not isinstance(items, list) or not items:
        raise DataError(f'{where}: field "{name}" must be a non-empty list of {{"{keys[0]}", "{keys[1]}"}} objects')
    out = []
    for i, m in enumerate(items):
        field = f"{name}[{i}]"
        turn = _turn(m, field, where, keys, roles)
        role, content = turn["role"], turn["content"]
        if role == "system" and i != 0:
            raise DataError(f'{where}: field "{field}.{keys[0]}": a system message may only come first')
        expected = "user" if (len(out) - (out[0]["role"] == "system" if out else 0)) % 2 == 0 else "assistant"
        if role != "system" and role != expected:
            raise DataError(f'{where}: field "{field}.{keys[0]}" is {m[keys[0]]!r}; turns must alternate '
                            f"user/assistant starting with user (expected {expected!r})")
        if role == "assistant" and not content.strip():
            raise DataError(f'{where}: field "{field}.{keys[1]}" is empty; every assistant turn needs text')
        out.append(turn)
    if out[-1]["role"] != "assistant":
        raise DataError(f'{where}: field "{name}[{len(out) - 1}].{keys[0]}": the last message must be the '
                        "assistant's answer")
    # an empty system turn says nothing: left out, so data.system applies as for a record without one
    return out[1:] if out[0]["role"] == "system" and not out[0]["content"].strip() else out


def from_messages(rec: dict, where: str) -> Example:
    """Chat records: roles system (first only), then user and assistant alternating, ending with assistant."""
    out = _conversation(rec.get("messages"), where, "messages", ("role", "content"), dict(zip(ROLES, ROLES)))
    return Example(_top_system(rec, out, where, "messages"), where, rec)


def from_sharegpt(rec: dict, where: str) -> Example:
    """ShareGPT records: "conversations" of {"from", "value"} (human/gpt/system), or {"role", "content"}."""
    items = rec.get("conversations")
    keys = _sharegpt_keys(items)
    if isinstance(items, list):
        for i, m in enumerate(items):
            role = m.get(keys[0]) if isinstance(m, dict) else None
            if isinstance(role, str) and role not in SHAREGPT_ROLES:
                raise DataError(f'{where}: field "conversations[{i}].{keys[0]}" is {role!r}, which slimtune cannot '
                                f"map to system/user/assistant (it reads {', '.join(SHAREGPT_ROLES)}); "
                                "convert or remove those turns")
    out = _conversation(items, where, "conversations", keys, SHAREGPT_ROLES)
    return Example(_top_system(rec, out, where, "conversations"), where, rec)


def _sharegpt_keys(items: Any) -> tuple[str, str]:
    """{"from", "value"} turns, or {"role", "content"} ones; a null "from" counts as absent (a datasets
    folder gives every row both sets of keys when its rows mix them)."""
    first = items[0] if isinstance(items, list) and items else None
    use_role = isinstance(first, dict) and first.get("from") is None and "role" in first
    return ("role", "content") if use_role else ("from", "value")


def _top_system(rec: dict, out: list[dict], where: str, name: str) -> list[dict]:
    """A top-level "system" beside the conversation is its system message (as LLaMA-Factory reads it);
    with a system turn inside too, which one was meant is unclear: refused."""
    system = rec.get("system")
    if system is None:
        return out
    if not isinstance(system, str):
        raise DataError(f'{where}: field "system" must be a string, got {type(system).__name__}')
    if not system.strip():  # "" or whitespace only: no system prompt (_note counts the latter)
        return out
    if out[0]["role"] == "system":
        raise DataError(f'{where}: field "system" is given beside a system message in "{name}"; keep one of them')
    return [{"role": "system", "content": system}] + out


FORMATS = {"alpaca": from_alpaca, "messages": from_messages, "sharegpt": from_sharegpt}


def _formats(keys: Iterable[str]) -> dict[str, list[str]]:
    """format: the fields that name it, of those in keys."""
    names = {"messages": ("messages",), "sharegpt": ("conversations",),
             "alpaca": ("instruction", "input", "output", "history")}
    found = {f: [k for k in fields if k in keys] for f, fields in names.items()}
    return {f: fields for f, fields in found.items() if fields}


def _detect(rec: dict, where: str) -> str:
    """The record's format by its fields; fields of two formats at once are refused (which one is meant?).
    A field set to null does not count there: a datasets folder holds every column in every row."""
    found = _formats([k for k, v in rec.items() if v is not None])
    if not found and len(_formats(rec)) > 1:
        raise DataError(f"{where}: fields {', '.join(map(json.dumps, rec))} are all null (a datasets row with no "
                        "value in any format's columns); fill in one format's fields or remove the row")
    found = found or _formats(rec)
    if len(found) > 1:
        fields = [k for names in found.values() for k in names]
        raise DataError(f"{where}: fields {', '.join(map(json.dumps, fields))} belong to different formats "
                        f"({' and '.join(found)}); keep one format per record")
    if not found:
        raise DataError(f'{where}: neither field "messages" (chat), "conversations" (sharegpt) nor '
                        f'"instruction"/"output" (alpaca) found; fields present: {", ".join(map(str, rec)) or "none"}')
    return next(iter(found))


def parse(rec: Any, where: str, fmt: str = "auto", notes: Notes | None = None) -> Example:
    """One raw record to an Example, by format (auto tells alpaca, messages and sharegpt by their fields)."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if fmt == "auto":
        fmt = _detect(rec, where)
    ex = FORMATS[fmt](rec, where)
    if notes is not None:
        _note(rec, ex, fmt, where, notes)
    return ex


def _note(rec: dict, ex: Example, fmt: str, where: str, notes: Notes) -> None:
    unknown = [str(k) for k, v in rec.items() if k not in KNOWN[fmt] and v is not None]  # null: a datasets column
    if unknown:
        notes.unknown(where, unknown, KNOWN[fmt])
    if any(m["role"] == "user" and not m["content"].strip() for m in ex.messages):
        notes.add("empty_user", where)
    for key in ("instruction", "input", "system") if fmt == "alpaca" else ("system",):
        if isinstance(rec.get(key), str) and rec[key] and not rec[key].strip():
            notes.add("blank", where, key)
    if fmt != "alpaca":
        name = "messages" if fmt == "messages" else "conversations"
        role, text = _sharegpt_keys(rec[name]) if fmt == "sharegpt" else ("role", "content")
        first = rec[name][0]  # parse checked it: an object with a string text
        if SHAREGPT_ROLES.get(first[role]) == "system" and not first[text].strip():
            notes.add("empty_system", where, f"{name}[0].{text}")
    notes.format(fmt, where)


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def read(path: str | Path, fmt: str = "auto", limit: int = 0, skipped: list[dict] | None = None,
         log: Callable[[str], None] = _warn, prompts: bool = False, answers: bool = False) -> list[Example]:
    """Every record of a file or folder, each checked; an empty source is an error. With `skipped` given
    (data.on_bad_record=skip), a bad record is appended there with its reason instead of stopping the read.
    Odd records that are still read are counted and reported through `log`, one line per kind.

    Args:
        prompts: read generation prompts: the answer is optional (alpaca) or absent (a chat ending with
            a user turn), and each Example ends with the user's turn.
        answers: with prompts, a chat may end with an assistant turn (the reference answer, left in the raw
            record), and {"prompt", "answer"} records are read too (GRPO's prompts).
    """
    p = Path(path)
    if limit < 0:
        raise DataError(f"{p}: data.limit={limit} is negative; use 0 for every record or a positive count")
    if not p.exists():
        raise DataError(f"{p}: {'prompts' if prompts else 'data'} file not found")
    examples, first, notes = [], len(skipped or []), Notes(p, unknown_keys=not prompts)
    for where, rec in _raw_records(p, lenient=True):
        try:
            examples.append(_check(rec, where, fmt, notes, prompts, answers))
        except DataError as err:
            if skipped is None:
                raise
            skipped.append(skip_entry(where, str(err), rec))
        if limit and len(examples) >= limit:
            break
    notes.report(log)
    if not examples:
        bad = len(skipped or []) - first
        what = f"every one of its {bad} records is bad; the first: {skipped[first]['reason']}" if bad else \
            f"no {'prompts' if prompts else 'records'} found"
        raise DataError(f"{p}: {what}")
    return examples


def _check(rec: Any, where: str, fmt: str, notes: Notes, prompts: bool, answers: bool = False) -> Example:
    if isinstance(rec, DataError):
        raise rec
    scan(rec, where, notes)
    if not prompts:
        return parse(rec, where, fmt, notes)
    ex = parse(_as_prompt(rec, where, answers), where, fmt, notes)
    return Example(ex.messages[:-1], where, rec)


def _as_prompt(rec: Any, where: str, answers: bool = False) -> Any:
    """A prompt record with a placeholder answer, so that it parses as a training record does. answers: a
    chat's last assistant turn is its reference answer, dropped here; {"prompt", "answer"} reads as alpaca."""
    if not isinstance(rec, dict):
        return rec
    if answers and "prompt" in rec and not {"instruction", "messages", "conversations"} & rec.keys():
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise DataError(f'{where}: field "prompt" must be a non-empty string')
        rec = {"instruction": rec["prompt"], **({"system": rec["system"]} if "system" in rec else {})}
    for key in ("messages", "conversations"):
        if key in rec and isinstance(rec[key], list):
            prev = rec[key][-1] if rec[key] else None
            if answers and isinstance(prev, dict) and (prev.get("role") or prev.get("from")) in ("assistant", "gpt"):
                rec, prev = dict(rec, **{key: rec[key][:-1]}), (rec[key][-2] if len(rec[key]) > 1 else None)
            if isinstance(prev, dict) and (prev.get("role") or prev.get("from")) in ("assistant", "gpt"):
                raise DataError(f'{where}: field "{key}": a prompt must end with a user message')
            role = {"role": "assistant"} if key == "messages" or (isinstance(prev, dict) and "role" in prev) \
                else {"from": "gpt"}
            other = "content" if "role" in role else "value"
            return dict(rec, **{key: list(rec[key]) + [{**role, other: "-"}]})
    return dict(rec, output="-")


def read_prompts(path: str | Path, log: Callable[[str], None] = _warn) -> tuple[list[Example], list[Any]]:
    """Prompts for generation (alpaca records, output optional, or chats ending with a user turn), with
    the raw records so outputs can carry them along."""
    out = read(path, log=log, prompts=True)
    return out, [ex.raw for ex in out]
