"""Read preference records (pairs for dpo/ipo/simpo/orpo, labelled answers for kto) into PrefRecords.

Pairs, each answer a string or one assistant message:
- TRL: {"prompt", "chosen", "rejected"}, the prompt a string or a message list ending with the user's turn;
  or TRL's implicit prompt: "chosen" and "rejected" full conversations sharing a prefix (the prompt).
- LLaMA-Factory alpaca: instruction / input / system / history + "chosen" and "rejected" strings.
- LLaMA-Factory ShareGPT: "conversations" (ending with the user's turn) + "chosen" and "rejected" turns,
  each {"from": "gpt", "value": ...}; a "messages" list of {"role", "content"} is read the same way.
Unpaired (kto): TRL's {"prompt", "completion", "label"}, or LLaMA-Factory's {"messages" (or
"conversations") whose last turn is the assistant's answer, "label"}; label true (desirable) or false.

Which of the two a file holds is told by its first record ("chosen"/"rejected": pairs; "label" or
"completion": unpaired); each record's own fields say which form it has. data.format alpaca, sharegpt or
messages (TRL's forms) restricts the forms read. Every record passes readers.py's guards (scan, Notes);
a bad one is one DataError naming file, record and field.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .checks import DataError, Notes, scan, skip_entry
from .readers import ROLES, SHAREGPT_ROLES, _conversation, _raw_records, _sharegpt_keys, _top_system, _warn, \
    from_alpaca


@dataclass
class PrefRecord:
    """A preference record as read: the prompt's messages and the answer texts."""
    prompt: list[dict[str, str]]  # system? then user/assistant turns, ending with the user's
    chosen: str  # the chosen answer (kto: the completion)
    rejected: str  # the rejected answer ("" for an unpaired kto record)
    where: str  # "train.jsonl line 17" or "data.json record 5"
    label: bool | None = None  # kto: desirable (True) or not; None for a pair
    raw: Any = None  # the record as read, for skipped_records.jsonl


CHAT = dict(zip(ROLES, ROLES))
# the fields that give a record's prompt, per form; a pair with none of them has TRL's implicit prompt
PAIR_FORMS = {"sharegpt": ("conversations",), "messages": ("messages",), "prompt": ("prompt",),
              "alpaca": ("instruction", "input", "history")}
KTO_FORMS = {"sharegpt": ("conversations",), "messages": ("messages",), "prompt": ("prompt",)}
KNOWN = {"sharegpt": {"conversations", "system"}, "messages": {"messages", "system"}, "prompt": {"prompt", "system"},
         "alpaca": {"instruction", "input", "history", "system"}, "implicit": set()}
# data.format: the forms it reads (auto reads them all)
FORMAT_FORMS = {"alpaca": {"alpaca"}, "sharegpt": {"sharegpt"}, "messages": {"messages", "prompt", "implicit"}}


def _present(rec: dict) -> list[str]:
    """Keys with a value: a datasets folder gives every row every column, null where a row has none."""
    return [str(k) for k, v in rec.items() if v is not None]


def kind_of(rec: Any, where: str) -> str:
    """"pairs" or "kto" by the record's fields, or an error saying what a preference record needs."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    keys = _present(rec)
    if "chosen" in keys or "rejected" in keys:
        return "pairs"
    if "label" in keys or "completion" in keys:
        return "kto"
    raise DataError(f'{where}: not a preference record: a pair needs "chosen" and "rejected", an unpaired (kto) '
                    f'record "completion" or "messages" and "label"; fields present: {", ".join(keys) or "none"}')


def _form(rec: dict, where: str, kind: str, fmt: str) -> str:
    forms = PAIR_FORMS if kind == "pairs" else KTO_FORMS
    keys = _present(rec)
    found = {f: [k for k in names if k in keys] for f, names in forms.items()}
    found = {f: names for f, names in found.items() if names}
    if len(found) > 1:
        fields = ", ".join(f'"{k}"' for names in found.values() for k in names)
        raise DataError(f"{where}: fields {fields} each give the prompt ({' and '.join(found)} forms); keep one")
    if not found and kind == "kto":
        raise DataError(f'{where}: field "prompt" is missing; an unpaired record needs "prompt" and "completion", '
                        'or "messages" ending with the answer')
    form = next(iter(found), "implicit")
    if fmt in FORMAT_FORMS and form not in FORMAT_FORMS[fmt]:
        raise DataError(f"{where}: a {form}-form record, but data.format={fmt}; set data.format=auto or convert it")
    return form


def _turn_keys(m: Any) -> tuple[str, str]:
    return ("from", "value") if isinstance(m, dict) and m.get("from") is not None else ("role", "content")


def _answer(rec: dict, key: str, where: str, need: str) -> str:
    """An answer: a string, an assistant turn ({"role", "content"} or {"from", "value"}), or a list holding
    one. Whitespace alone reads as "" (an empty answer, counted where the record is encoded)."""
    value = rec.get(key)
    if value is None:
        raise DataError(f'{where}: field "{key}" is missing; {need}')
    if isinstance(value, list):
        if len(value) != 1:
            raise DataError(f'{where}: field "{key}" must hold one assistant message, got {len(value)} messages; '
                            "put the earlier turns in the prompt")
        return _answer_text(value[0], f"{key}[0]", where)
    return _answer_text(value, key, where)


def _answer_text(value: Any, name: str, where: str) -> str:
    if isinstance(value, str):
        return value if value.strip() else ""
    if not isinstance(value, dict):
        raise DataError(f'{where}: field "{name}" must be a string or an assistant message, got '
                        f"{type(value).__name__}")
    keys = _turn_keys(value)
    role = value.get(keys[0])
    if not isinstance(role, str) or SHAREGPT_ROLES.get(role) != "assistant":
        raise DataError(f'{where}: field "{name}.{keys[0]}" is {role!r}; an answer must be the assistant\'s '
                        '("assistant" or "gpt")')
    content = value.get(keys[1])
    if content is None:
        raise DataError(f'{where}: field "{name}.{keys[1]}" is missing; every message needs its text')
    if not isinstance(content, str):
        raise DataError(f'{where}: field "{name}.{keys[1]}" must be a string, got {type(content).__name__}')
    return content if content.strip() else ""


def _prompt_turns(rec: dict, items: Any, where: str, name: str) -> list[dict]:
    """A prompt's messages (system first, then turns ending with the user's), read as readers.py reads a
    conversation: a placeholder answer is appended, checked with the rest, and taken off again."""
    first = items[0] if isinstance(items, list) and items else None
    keys = _sharegpt_keys(items) if name == "conversations" else _turn_keys(first)
    roles = SHAREGPT_ROLES if keys[0] == "from" or name == "conversations" else CHAT
    last = items[-1].get(keys[0]) if isinstance(items, list) and items and isinstance(items[-1], dict) else None
    if isinstance(last, str) and roles.get(last) == "assistant":
        raise DataError(f'{where}: field "{name}[{len(items) - 1}].{keys[0]}": the prompt must end with the '
                        "user's message (the answers follow it)")
    if isinstance(items, list) and items:
        items = items + [{keys[0]: "assistant", keys[1]: "-"}]
    out = _conversation(items, where, name, keys, roles)
    return _top_system(rec, out, where, name)[:-1]


def _system_prompt(rec: dict, where: str, text: Any) -> list[dict]:
    """TRL's prompt string as the user's turn (a top-level "system" before it)."""
    if not isinstance(text, str):
        raise DataError(f'{where}: field "prompt" must be a string or a list of messages, got {type(text).__name__}')
    return _top_system(rec, [{"role": "user", "content": text}], where, "prompt")


def _prompt(rec: dict, where: str, form: str) -> list[dict]:
    if form == "alpaca":  # readers.py's alpaca rules, with a placeholder output taken off again
        fields = {k: rec.get(k) for k in ("instruction", "input", "system", "history")}
        return from_alpaca({**fields, "output": "-"}, where).messages[:-1]
    if form == "prompt":
        text = rec["prompt"]
        return _prompt_turns(rec, text, where, "prompt") if isinstance(text, list) else _system_prompt(rec, where, text)
    return _prompt_turns(rec, rec[form if form == "messages" else "conversations"], where,
                         "messages" if form == "messages" else "conversations")


def _implicit(rec: dict, where: str) -> PrefRecord:
    """TRL's implicit prompt: "chosen" and "rejected" full conversations; the prompt is the messages they
    share at the start, and each must go on with one assistant message."""
    chosen, rejected = rec.get("chosen"), rec.get("rejected")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise DataError(f'{where}: field "{key}" is missing; every pair needs "chosen" and "rejected"')
        if not isinstance(value, list) or not value:
            raise DataError(f'{where}: field "prompt" is missing; a pair without one needs "chosen" and "rejected" '
                            f'as full conversations (message lists) sharing the prompt, got "{key}" as '
                            f"{type(value).__name__}")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if not n:
        raise DataError(f'{where}: fields "chosen" and "rejected" share no first message, so the prompt is unclear; '
                        'give "prompt" or start both with the same user message')
    prompt = _prompt_turns(rec, chosen[:n], where, "chosen")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if len(value) != n + 1:
            raise DataError(f'{where}: field "{key}[{n}]": after the {n} messages "chosen" and "rejected" share, '
                            f"each must end with one assistant message; {key} has {len(value) - n}")
    return PrefRecord(prompt, _answer_text(chosen[n], f"chosen[{n}]", where),
                      _answer_text(rejected[n], f"rejected[{n}]", where), where, raw=rec)


PAIR_NEED = 'every pair needs "chosen" and "rejected"'


def parse_pair(rec: dict, where: str, form: str) -> PrefRecord:
    """One pair record of a known form."""
    if form == "implicit":
        return _implicit(rec, where)
    prompt = _prompt(rec, where, form)
    chosen, rejected = (_answer(rec, k, where, PAIR_NEED) for k in ("chosen", "rejected"))
    return PrefRecord(prompt, chosen, rejected, where, raw=rec)


def _label(rec: dict, where: str) -> bool:
    label = rec.get("label")
    if label is None:
        raise DataError(f'{where}: field "label" is missing; every unpaired record needs "label": true (a desirable '
                        "answer) or false (an undesirable one)")
    if not isinstance(label, bool):
        raise DataError(f'{where}: field "label" must be true or false, got {type(label).__name__} {label!r}')
    return label


def parse_kto(rec: dict, where: str, form: str) -> PrefRecord:
    """One unpaired record: TRL's prompt + completion, or a conversation whose last turn is the answer."""
    label = _label(rec, where)
    if form == "prompt":
        need = 'every unpaired record needs "completion" beside "prompt"'
        return PrefRecord(_prompt(rec, where, form), _answer(rec, "completion", where, need), "", where, label, rec)
    name = "messages" if form == "messages" else "conversations"
    items = rec[name]
    keys = _sharegpt_keys(items) if name == "conversations" else ("role", "content")
    msgs = _conversation(items, where, name, keys, SHAREGPT_ROLES if name == "conversations" else CHAT)
    msgs = _top_system(rec, msgs, where, name)
    return PrefRecord(msgs[:-1], msgs[-1]["content"], "", where, label, rec)


def parse(rec: Any, where: str, kind: str, fmt: str = "auto", notes: Notes | None = None) -> PrefRecord:
    """One raw record of a "pairs" or "kto" file to a PrefRecord."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    form = _form(rec, where, kind, fmt)
    out = (parse_pair if kind == "pairs" else parse_kto)(rec, where, form)
    if notes is not None:
        answers = {"chosen", "rejected"} if kind == "pairs" else {"completion", "label"}
        known = KNOWN[form] | answers
        unknown = [k for k in _present(rec) if k not in known]
        if unknown:
            notes.unknown(where, unknown, known)
        notes.format(form, where)
    return out


def read(path: str | Path, fmt: str = "auto", limit: int = 0, skipped: list[dict] | None = None,
         log: Callable[[str], None] = _warn, kind: str = "") -> tuple[str, list[PrefRecord]]:
    """(kind, records) of a file or folder: kind "pairs" or "kto", told by the first record unless given
    (an eval file must hold what the training file does). skipped: as readers.read."""
    p = Path(path)
    if limit < 0:
        raise DataError(f"{p}: data.limit={limit} is negative; use 0 for every record or a positive count")
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    records, first, notes = [], len(skipped or []), Notes(p)
    for where, rec in _raw_records(p, lenient=True):
        try:
            if isinstance(rec, DataError):
                raise rec
            scan(rec, where, notes)
            kind = kind or kind_of(rec, where)
            records.append(parse(rec, where, kind, fmt, notes))
        except DataError as err:
            if skipped is None:
                raise
            skipped.append(skip_entry(where, str(err), rec))
        if limit and len(records) >= limit:
            break
    notes.report(log)
    if not records:
        bad = len(skipped or []) - first
        raise DataError(f"{p}: " + (f"every one of its {bad} records is bad; the first: {skipped[first]['reason']}"
                                    if bad else "no records found"))
    return kind, records


def peek_kind(path: str | Path) -> str:
    """"pairs", "kto", or "" (not preference data) by the first readable record of a file or folder. A chat or
    alpaca record that carries some other "label" (a class name, a score) is not taken for kto's."""
    for where, rec in _raw_records(Path(path), lenient=True):
        if isinstance(rec, dict):
            try:
                kind = kind_of(rec, where)
            except DataError:
                return ""
            other_label = kind == "kto" and rec.get("completion") is None and not isinstance(rec.get("label"), bool)
            return "" if other_label else kind
    return ""
