"""Data: read and check every record, render them with a chat template, encode with masks, split train/eval.

data.on_bad_record=error stops at the first bad record; skip leaves it out and lists it, with its reason and
the record itself, in Built.skipped (train writes them to skipped_records.jsonl): a dataset never shrinks
silently. Bad records are those the readers refuse, those the template cannot render, those with more than
data.max_turns turns, and those left with no answer token after truncation.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from . import guards, readers
from .checks import skip_entry
from .encode import Encoded, Stats, encode
from .guards import Findings
from .readers import DataError, Example
from .templates import RecordTemplateError, check_tokens, render

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import DataConfig


@dataclass
class Built:
    train: list[Encoded]
    eval: list[Encoded]
    train_stats: Stats
    eval_stats: Stats
    skipped: list[dict] = field(default_factory=list)  # {"where", "reason", "record"} of each record left out
    eval_examples: list[Example] = field(default_factory=list)  # eval's records as read, in its order


def read(path: str | Path, fmt: str = "auto", limit: int = 0, skipped: list[dict] | None = None,
         log: Callable[[str], None] = readers._warn) -> list[Example]:
    """Every record of a file or folder, each checked (readers.read: the one path every command reads
    through); with `skipped` given (data.on_bad_record=skip), bad records are listed there instead."""
    return readers.read(path, fmt, limit, skipped, log)


def with_system(ex: Example, system: str) -> list[dict]:
    """The record's messages, with the config's default system prompt when the record has none."""
    if system and ex.messages[0]["role"] != "system":
        return [{"role": "system", "content": system}] + ex.messages
    return ex.messages


def _turns(ex: Example, max_turns: int) -> None:
    """A record with more turns than data.max_turns is a bad record: one huge chat (5,000 turns is a 60 KB
    line) costs seconds to render and is cut at data.max_len anyway."""
    n = sum(m["role"] != "system" for m in ex.messages)
    if max_turns and n > max_turns:
        raise DataError(f"{ex.where}: {n} user/assistant turns, more than data.max_turns={max_turns}; split the "
                        "conversation, or raise data.max_turns (0 = no cap)")


def _encode_one(ex: Example, tokenizer: PreTrainedTokenizerBase, cfg_data: DataConfig,
                found: Findings | None = None) -> Encoded:
    _turns(ex, cfg_data.max_turns)
    messages, keep = guards.think_messages(with_system(ex, cfg_data.system), cfg_data.template, tokenizer,
                                           getattr(cfg_data, "think_history", "error"), ex.where, found)
    try:
        rendered = render(cfg_data.template, messages, tokenizer, keep_think=keep)
    except RecordTemplateError as err:
        raise RecordTemplateError(f"{ex.where}: {err}") from None
    return encode(rendered, tokenizer, cfg_data.max_len, cfg_data.train_on_prompt, ex.where,
                  cfg_data.allow_special_tokens)


def encode_pairs(examples: list[Example], tokenizer: PreTrainedTokenizerBase, cfg_data: DataConfig,
                 skipped: list[dict] | None = None, log: Callable[[str], None] = readers._warn,
                 check: bool = True) -> tuple[list[tuple[Example, Encoded]], Stats]:
    """(example, encoded) of each record that renders; with `skipped` given, a record the template cannot
    render or with too many turns is listed there instead of stopping the run. check=False: the template's
    control tokens were already checked (and a forced one warned about) for this run."""
    if cfg_data.max_turns < 0:
        raise DataError(f"data.max_turns={cfg_data.max_turns} is negative; use 0 for no cap or a positive count")
    warning = check_tokens(cfg_data.template, tokenizer, cfg_data.force_template)
    if warning and check:
        log(warning)
    stats, out = Stats(), []
    guards.check_choice(cfg_data.template, tokenizer, getattr(cfg_data, "think_history", "error"))
    found = stats.guards = Findings(cfg_data.template)
    stops = guards.stop_set(cfg_data.template, tokenizer)
    for ex in examples:
        try:
            enc = _encode_one(ex, tokenizer, cfg_data, found)
        except (DataError, RecordTemplateError) as err:
            if skipped is None:
                raise
            skipped.append(skip_entry(ex.where, str(err), ex.raw))
            continue
        has_prompt = any(m["role"] != "assistant" for m in ex.messages)
        for kind in guards.check(enc, has_prompt, cfg_data.train_on_prompt, stops):
            found.add(kind, ex.where)
        stats.add(enc)
        out.append((ex, enc))
    if stats.special_records and not cfg_data.allow_special_tokens:
        log(f"warning: {stats.special_records} records hold the text of this tokenizer's control tokens "
            f"(like {tokenizer.eos_token}) in their messages, encoded as plain text (first: {stats.first_special}); "
            "set data.allow_special_tokens=true if it is meant as control tokens")
    return out, stats


def encode_examples(examples: list[Example], tokenizer: PreTrainedTokenizerBase, cfg_data: DataConfig,
                    log: Callable[[str], None] = readers._warn) -> tuple[list[Encoded], Stats]:
    """Encode every record; the first that cannot be rendered stops with an error naming it."""
    pairs, stats = encode_pairs(examples, tokenizer, cfg_data, log=log)
    return [enc for _, enc in pairs], stats


def split(examples: list[Example], size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a fraction (size < 1) or a count (size >= 1) of records, chosen by seed."""
    n = int(size) if size >= 1 else int(round(len(examples) * size))
    n = min(n, len(examples) - 1)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def build(cfg_data: DataConfig, tokenizer: PreTrainedTokenizerBase, log: Callable[[str], None] = print) -> Built:
    """Read, check, split and encode; print what was read, skipped and truncated. Records dropped for having
    no answer left after truncation are listed in Built.skipped too."""
    skipped: list[dict] | None = [] if cfg_data.on_bad_record == "skip" else None
    examples = read(cfg_data.train, cfg_data.format, cfg_data.limit, skipped, log)
    if cfg_data.eval:
        train_ex, eval_ex = examples, read(cfg_data.eval, cfg_data.format, skipped=skipped, log=log)
    else:
        train_ex, eval_ex = split(examples, cfg_data.eval_size, cfg_data.seed)
    log(f"read {len(examples)} records from {cfg_data.train}"
        + (f" and {len(eval_ex)} from {cfg_data.eval}" if cfg_data.eval else
           f"; held out {len(eval_ex)} for eval"))
    read_bad = len(skipped or [])
    if read_bad:
        log(f"skipped {read_bad} bad records (data.on_bad_record=skip); first: {skipped[0]['reason']}")
    train, tstats = encode_pairs(train_ex, tokenizer, cfg_data, skipped, log)
    held, estats = encode_pairs(eval_ex, tokenizer, cfg_data, skipped, log, check=False)
    tstats.guards.merge(estats.guards)
    tstats.guards.refuse()  # a template that masks answers wrongly stops the run here, before the model loads
    skipped = skipped if skipped is not None else []
    if len(skipped) > read_bad:
        log(f"skipped {len(skipped) - read_bad} records that cannot be encoded (data.on_bad_record=skip); "
            f"first: {skipped[read_bad]['reason']}")
    log(tstats.summary("train", cfg_data.max_len))
    if held:
        log(estats.summary("eval", cfg_data.max_len))
    train = _drop_empty(train, "train", log, skipped, cfg_data.max_len)
    held = _drop_empty(held, "eval", log, skipped, cfg_data.max_len)
    if not tstats.records:
        raise DataError(f"{cfg_data.train}: no training record could be encoded; the first: "
                        f"{skipped[read_bad]['reason']}")
    if not train:
        raise DataError(f"{cfg_data.train}: no training record has an answer token left within "
                        f"data.max_len={cfg_data.max_len}; raise data.max_len")
    return Built([r for _, r in train], [r for _, r in held], tstats, estats, skipped, [ex for ex, _ in held])


def _drop_empty(records: list[tuple[Example, Encoded]], name: str, log: Callable[[str], None], skipped: list[dict],
                max_len: int) -> list[tuple[Example, Encoded]]:
    """Records with no trained token left are not used: the loss skips each record's first position (it
    has no previous token), so a label there alone trains nothing."""
    kept, lost = [], []
    for ex, r in records:
        (kept if any(x != -100 for x in r.labels[1:]) else lost).append((ex, r))
    if lost:
        log(f"{name}: {len(lost)} records have no trained token left after truncation and are not used "
            f"(first: {lost[0][1].where})")
        reason = f"no trained token left after truncation to data.max_len={max_len}"
        skipped += [skip_entry(r.where, f"{r.where}: {reason}", ex.raw) for ex, r in lost]
    return kept


__all__ = ["Built", "DataError", "Encoded", "Example", "build", "encode_examples", "read", "render", "split"]
