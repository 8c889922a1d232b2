"""Data: read and check every record, render them with a chat template, encode with masks, split train/eval.

data.on_bad_record=error stops at the first bad record; skip leaves it out and lists it, with its reason,
in Built.skipped (train writes them to skipped_records.jsonl): a dataset never shrinks silently.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import readers
from .encode import Encoded, Stats, encode
from .readers import DataError, Example, parse
from .templates import render


@dataclass
class Built:
    train: list[Encoded]
    eval: list[Encoded]
    train_stats: Stats
    eval_stats: Stats
    skipped: list[dict] = field(default_factory=list)  # {"where", "reason", "record"} of each record left out
    eval_examples: list[Example] = field(default_factory=list)  # eval's records as read, in its order


def _lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) of a file; a broken JSONL line as (where, DataError) so that skip mode can pass over it."""
    return readers._raw_records(path, lenient=True)


def _bad_text(rec: Any) -> str | None:
    """The field holding the first string that is not Unicode text: a JSON escape like \\ud800 reads as a
    lone surrogate, which the tokenizer rejects with a TypeError from deep inside. (A loop, not recursion:
    a record may nest as deep as json allows.)"""
    stack = [("", rec)]
    while stack:
        name, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return name or "(record)"
        elif isinstance(value, (dict, list)):
            items = value.items() if isinstance(value, dict) else enumerate(value)
            stack += reversed([(f"{name}[{k}]" if isinstance(k, int) else f"{name}.{k}" if name else str(k), v)
                               for k, v in items])
    return None


def _check(rec: Any, where: str, fmt: str) -> Example:
    if isinstance(rec, DataError):
        raise rec
    bad = _bad_text(rec)
    if bad:
        raise DataError(f'{where}: field "{bad}" holds an unpaired surrogate (a \\ud800-style escape), which is '
                        "not text; fix or remove that character")
    return parse(rec, where, fmt)


def read(path: str | Path, fmt: str = "auto", limit: int = 0, skipped: list[dict] | None = None) -> list[Example]:
    """Every record of a file or folder, each checked; an empty source is an error. With `skipped` given
    (data.on_bad_record=skip), a bad record is appended there with its reason instead of stopping the read."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    examples, first = [], len(skipped or [])
    try:
        for where, rec in _lines(p):
            try:
                examples.append(_check(rec, where, fmt))
            except DataError as err:
                if skipped is None:
                    raise
                skipped.append({"where": where, "reason": str(err), "record": _jsonable(rec)})
            if limit and len(examples) >= limit:
                break
    except RecursionError:
        raise DataError(f"{p}: JSON nested too deeply to read") from None
    if not examples:
        bad = len(skipped or []) - first
        what = f"every one of its {bad} records is bad; the first: {skipped[first]['reason']}" if bad else \
            "no records found"
        raise DataError(f"{p}: {what}")
    return examples


def _jsonable(rec: Any) -> Any:
    """The record as skipped_records.jsonl holds it (a broken line: its reason says enough)."""
    return None if isinstance(rec, DataError) else rec


def with_system(ex: Example, system: str) -> list[dict]:
    """The record's messages, with the config's default system prompt when the record has none."""
    if system and ex.messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + ex.messages
    return ex.messages


def encode_examples(examples: list[Example], tokenizer, cfg_data) -> tuple[list[Encoded], Stats]:
    stats, out = Stats(), []
    for ex in examples:
        rendered = render(cfg_data.template, with_system(ex, cfg_data.system), tokenizer)
        enc = encode(rendered, tokenizer, cfg_data.max_len, cfg_data.train_on_prompt, ex.where)
        stats.add(enc)
        out.append(enc)
    return out, stats


def split(examples: list[Example], size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a fraction (size < 1) or a count (size >= 1) of records, chosen by seed."""
    n = int(size) if size >= 1 else int(round(len(examples) * size))
    n = min(n, len(examples) - 1)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def build(cfg_data, tokenizer, log=print) -> Built:
    """Read, check, split and encode; print what was read, skipped and truncated. Records dropped for having
    no answer left after truncation are listed in Built.skipped too."""
    skipped: list[dict] | None = [] if cfg_data.on_bad_record == "skip" else None
    examples = read(cfg_data.train, cfg_data.format, cfg_data.limit, skipped)
    if cfg_data.eval:
        train_ex, eval_ex = examples, read(cfg_data.eval, cfg_data.format, skipped=skipped)
    else:
        train_ex, eval_ex = split(examples, cfg_data.eval_size, cfg_data.seed)
    log(f"read {len(examples)} records from {cfg_data.train}"
        + (f" and {len(eval_ex)} from {cfg_data.eval}" if cfg_data.eval else
           f"; held out {len(eval_ex)} for eval"))
    skipped = skipped if skipped is not None else []
    if skipped:
        log(f"skipped {len(skipped)} bad records (data.on_bad_record=skip); first: {skipped[0]['reason']}")
    train, tstats = encode_examples(train_ex, tokenizer, cfg_data)
    held, estats = encode_examples(eval_ex, tokenizer, cfg_data)
    log(tstats.summary("train", cfg_data.max_len))
    if held:
        log(estats.summary("eval", cfg_data.max_len))
    train = _drop_empty(train, "train", log, skipped, cfg_data.max_len)
    encoded, held = held, _drop_empty(held, "eval", log, skipped, cfg_data.max_len)
    kept = {id(r) for r in held}
    eval_ex = [ex for ex, r in zip(eval_ex, encoded) if id(r) in kept]  # still one example per eval record
    if not train:
        raise DataError(f"{cfg_data.train}: no training record has an answer token left within "
                        f"data.max_len={cfg_data.max_len}; raise data.max_len")
    return Built(train, held, tstats, estats, skipped, eval_ex)


def _drop_empty(records: list[Encoded], name: str, log, skipped: list[dict], max_len: int) -> list[Encoded]:
    """Records with no trained token left are not used: the loss skips each record's first position (it
    has no previous token), so a label there alone trains nothing."""
    kept, lost = [], []
    for r in records:
        (kept if any(x != -100 for x in r.labels[1:]) else lost).append(r)
    if lost:
        log(f"{name}: {len(lost)} records have no trained token left after truncation and are not used "
            f"(first: {lost[0].where})")
        reason = f"no trained token left after truncation to data.max_len={max_len}"
        skipped += [{"where": r.where, "reason": f"{r.where}: {reason}", "record": None} for r in lost]
    return kept


__all__ = ["Built", "DataError", "Encoded", "Example", "build", "encode_examples", "read", "render", "split"]
