"""PrefRecords to EncodedPairs: the prompt masked, each answer trained with its end token.

prompt + answer is rendered and encoded exactly as SFT encodes a record (data/__init__.py's `_encode_one`: the
template, data.system for records without a system message, control-token text escaped), and the answer's
tokens are those from its last masked token on, so the ids at the boundary are the ones SFT trains on. The
two answers of a pair share one prompt: the tokens both encodings start with, up to where the first answer
starts (a template whose last prompt token joins the answer's first characters gives that token to both
answers). The prompt is never trained (data.train_on_prompt does not apply).

Truncation to data.max_len applies to the longer of prompt + chosen and prompt + rejected: the prompt is
cut on the LEFT first (its end holds the assistant header the answers follow, and at least KEEP_PROMPT
tokens of it stay), then both answers on the right to the room left. Both are counted (PairStats).

A pair that trains nothing is a bad record: an empty answer, or chosen and rejected the same tokens (as
written, or once cut to data.max_len). data.on_bad_record=error stops at it naming the record; skip leaves
it out, lists it in `skipped` and counts it (PairStats.identical, .empty, .first_bad).
"""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING

from . import _encode_one
from .checks import DataError, skip_entry
from .encode import IGNORE
from .pairs import EncodedPair, PairStats
from .pref_read import PrefRecord
from .readers import Example
from .templates import RecordTemplateError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import DataConfig

# Prompt tokens a left cut keeps at least: the assistant header alone is 3-5 tokens in ChatML and Llama 3,
# and a few tokens of the user's text before it keep the answer attached to a question.
KEEP_PROMPT = 8
FIRST_BAD = 3  # records named in the log line about identical / empty pairs
SKIP_HINT = "fix or remove the record, or set data.on_bad_record=skip to leave such pairs out"


class BadPair(DataError):
    """A record that trains nothing; kind is the PairStats counter it adds to ("identical" or "empty")."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _answer_ids(rec: PrefRecord, answer: str, tokenizer: PreTrainedTokenizerBase, cfg_data: DataConfig) \
        -> tuple[list[int], int, int]:
    """(ids of prompt + answer as SFT encodes them, where the answer starts, control-token texts escaped)."""
    ex = Example(rec.prompt + [{"role": "assistant", "content": answer}], rec.where, rec.raw)
    enc = _encode_one(ex, tokenizer, replace(cfg_data, max_len=sys.maxsize, train_on_prompt=False))
    start = max((i for i, x in enumerate(enc.labels) if x == IGNORE), default=-1) + 1
    return enc.input_ids, start, enc.special_text


def _shared(a: list[int], b: list[int], limit: int) -> int:
    """How many first tokens a and b share, at most limit."""
    n = 0
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_len: int) \
        -> tuple[list[int], list[int], list[int]]:
    """Fit prompt + the longer answer in max_len: the prompt cut on the left (down to KEEP_PROMPT tokens,
    or half of max_len), then the answers on the right."""
    over = len(prompt) + max(len(chosen), len(rejected)) - max_len
    if over <= 0:
        return prompt, chosen, rejected
    keep = min(len(prompt), KEEP_PROMPT, max(max_len // 2, 1))
    prompt = prompt[min(over, len(prompt) - keep):]
    room = max_len - len(prompt)
    return prompt, chosen[:room], rejected[:room]


def _check_text(rec: PrefRecord) -> None:
    for name, text in (("chosen", rec.chosen), ("rejected", rec.rejected)) if rec.label is None else \
            (("completion", rec.chosen),):
        if not text:
            what = "a pair needs two non-empty answers" if rec.label is None else "the record needs an answer"
            raise BadPair(f"{rec.where}: the {name} answer is empty; {what}; {SKIP_HINT}", "empty")
    if rec.label is None and rec.chosen == rec.rejected:
        raise BadPair(f"{rec.where}: chosen and rejected are the same answer, so the pair trains nothing; "
                      f"{SKIP_HINT}", "identical")


def encode_record(rec: PrefRecord, tokenizer: PreTrainedTokenizerBase, cfg_data: DataConfig) -> EncodedPair:
    """One record to an EncodedPair cut to cfg_data.max_len; a BadPair for an empty or identical pair, a
    DataError or RecordTemplateError (naming the record) for one the template cannot render."""
    _check_text(rec)
    ids_c, start_c, special = _answer_ids(rec, rec.chosen, tokenizer, cfg_data)
    ids_r, start_r = [], start_c
    if rec.label is None:
        ids_r, start_r, special_r = _answer_ids(rec, rec.rejected, tokenizer, cfg_data)
        special += special_r
    at = _shared(ids_c, ids_r, min(start_c, start_r)) if rec.label is None else start_c
    prompt, chosen, rejected = ids_c[:at], ids_c[at:], ids_r[at:]
    cut = truncate(prompt, chosen, rejected, cfg_data.max_len)
    pair = EncodedPair(*cut, where=rec.where, label=rec.label, special_text=special)
    pair.prompt_cut = len(prompt) - len(pair.prompt)
    pair.answer_cut = len(pair.chosen) < len(chosen) or len(pair.rejected) < len(rejected)
    pair.truncated = bool(pair.prompt_cut or pair.answer_cut)
    if not pair.chosen:
        raise BadPair(f"{rec.where}: data.max_len={cfg_data.max_len} leaves no room for the answers; raise "
                      "data.max_len", "empty")
    if rec.label is None and pair.chosen == pair.rejected:
        raise BadPair(f"{rec.where}: chosen and rejected are the same in their first {len(pair.chosen)} tokens, "
                      f"all that data.max_len={cfg_data.max_len} leaves them, so the pair trains nothing; raise "
                      f"data.max_len, or {SKIP_HINT}", "identical")
    return pair


def count(stats: PairStats, pair: EncodedPair) -> None:
    """Add one encoded record to the totals."""
    stats.records += 1
    stats.truncated += pair.truncated
    stats.prompt_cut += pair.prompt_cut > 0
    stats.answer_cut += pair.answer_cut
    stats.tokens += len(pair.prompt) + len(pair.chosen) + len(pair.rejected)
    if pair.label is not None:
        stats.desirable += pair.label
        stats.undesirable += not pair.label
    stats.special_records += pair.special_text > 0


def encode_records(records: list[PrefRecord], tokenizer: PreTrainedTokenizerBase, cfg_data: DataConfig,
                   skipped: list[dict] | None = None) -> tuple[list[EncodedPair], PairStats]:
    """Encode every record; with `skipped` given (data.on_bad_record=skip) a bad one is listed there and
    left out, else the first stops with its error. Identical and empty pairs are counted either way."""
    stats, out = PairStats(), []
    for rec in records:
        try:
            pair = encode_record(rec, tokenizer, cfg_data)
        except (DataError, RecordTemplateError) as err:
            if isinstance(err, BadPair):
                setattr(stats, err.kind, getattr(stats, err.kind) + 1)
                if len(stats.first_bad) < FIRST_BAD:
                    stats.first_bad.append(rec.where)
            if skipped is None:
                raise
            skipped.append(skip_entry(rec.where, str(err), rec.raw))
            continue
        count(stats, pair)
        out.append(pair)
    return out, stats


def summary(stats: PairStats, name: str, max_len: int) -> str:
    """One line of totals: records, tokens, truncation, and the identical and empty pairs left out."""
    kto = stats.desirable or stats.undesirable
    what = f"{stats.records} records ({stats.desirable} desirable, {stats.undesirable} undesirable)" if kto \
        else f"{stats.records} pairs"
    line = (f"{name}: {what}, {stats.tokens} tokens; {stats.truncated} truncated at max_len={max_len} "
            f"({stats.prompt_cut} cut on the prompt's left, {stats.answer_cut} on the answers' right)")
    line += f"; {stats.identical} identical and {stats.empty} empty left out"
    if stats.first_bad:
        line += f" (first: {', '.join(stats.first_bad)})"
    return line


def special_warning(stats: PairStats, tokenizer: PreTrainedTokenizerBase, cfg_data: DataConfig) -> str:
    """The warning SFT prints for control-token text inside messages, or ""."""
    if not stats.special_records or cfg_data.allow_special_tokens:
        return ""
    return (f"warning: {stats.special_records} records hold the text of this tokenizer's control tokens (like "
            f"{tokenizer.eos_token}) in their messages, encoded as plain text; set data.allow_special_tokens=true "
            "if it is meant as control tokens")

