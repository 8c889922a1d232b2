"""Preference data for train.objective dpo | ipo | simpo | orpo | kto: read, split and encode, as data.build
does for sft.

The formats are read in pref_read.py (TRL's and LLaMA-Factory's pairs, TRL's and LLaMA-Factory's unpaired
kto records) and encoded in pref_encode.py (the prompt masked and cut on the left first, the answers
trained with their end token). kto trains on pairs too: each chosen answer becomes a desirable record and
each rejected one an undesirable record (TRL's unpair_preference_dataset), the two halves of a pair on the
same side of the train/eval split. The pair objectives refuse unpaired records.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from . import pref_read, split
from .checks import DataError
from .pairs import BuiltPairs, EncodedPair, PairStats
from .pref_encode import encode_record, encode_records, special_warning, summary
from .pref_read import PrefRecord
from .templates import check_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import Config, DataConfig

PAIRED = ("dpo", "ipo", "simpo", "orpo")


def unpair(records: list[PrefRecord]) -> list[PrefRecord]:
    """Pairs as kto's unpaired records: each chosen answer desirable, each rejected one undesirable."""
    out = []
    for r in records:
        out += [PrefRecord(r.prompt, r.chosen, "", r.where, True, r.raw),
                PrefRecord(r.prompt, r.rejected, "", r.where, False, r.raw)]
    return out


def for_objective(kind: str, records: list[PrefRecord], objective: str, source: str) -> list[PrefRecord]:
    """The records as `objective` trains on them: pairs unpaired for kto; unpaired records refused for the pair
    objectives (which answer would they be compared with?)."""
    if objective == "kto" and kind == "pairs":
        return unpair(records)
    if objective in PAIRED and kind == "kto":
        raise DataError(f"{source}: unpaired records (one answer and a label each), but train.objective={objective} "
                        "compares a chosen with a rejected answer; use train.objective=kto, or give pairs "
                        '("chosen" and "rejected")')
    return records


def read_split(cfg_data: DataConfig, skipped: list[dict] | None, log: Callable[[str], None]) \
        -> tuple[str, list[PrefRecord], list[PrefRecord]]:
    """(kind, train records, held-out records): data.eval read, or data.eval_size held out by data.seed."""
    kind, records = pref_read.read(cfg_data.train, cfg_data.format, cfg_data.limit, skipped, log)
    what = "pairs" if kind == "pairs" else "unpaired records"
    if cfg_data.eval:
        _, held = pref_read.read(cfg_data.eval, cfg_data.format, skipped=skipped, log=log, kind=kind)
        log(f"read {len(records)} {what} from {cfg_data.train} and {len(held)} from {cfg_data.eval}")
        return kind, records, held
    train, held = split(records, cfg_data.eval_size, cfg_data.seed)
    log(f"read {len(records)} {what} from {cfg_data.train}; held out {len(held)} for eval")
    return kind, train, held


def _report(train: PairStats, held: PairStats, skipped: list[dict], read_bad: int, cfg_data: DataConfig,
            log: Callable[[str], None]) -> None:
    if len(skipped) > read_bad:
        log(f"skipped {len(skipped) - read_bad} records that cannot be used (data.on_bad_record=skip); first: "
            f"{skipped[read_bad]['reason']}")
    log(summary(train, "train", cfg_data.max_len))
    if held.records or held.identical or held.empty:
        log(summary(held, "eval", cfg_data.max_len))


def build_pairs(cfg: Config, tokenizer: PreTrainedTokenizerBase, log: Callable[[str], None] = print) -> BuiltPairs:
    """Read data.train (and data.eval), split, and encode for cfg.train.objective; print what was read,
    skipped and truncated. data.on_bad_record=skip lists every record left out in BuiltPairs.skipped."""
    d = cfg.data
    skipped: list[dict] | None = [] if d.on_bad_record == "skip" else None
    kind, train_recs, held_recs = read_split(d, skipped, log)
    read_bad = len(skipped or [])
    if read_bad:
        log(f"skipped {read_bad} bad records (data.on_bad_record=skip); first: {skipped[0]['reason']}")
    train_recs = for_objective(kind, train_recs, cfg.train.objective, d.train)
    held_recs = for_objective(kind, held_recs, cfg.train.objective, d.eval or d.train)
    if kind == "pairs" and cfg.train.objective == "kto":
        log(f"train.objective=kto: each pair read as a desirable (chosen) and an undesirable (rejected) record: "
            f"{len(train_recs)} for training, {len(held_recs)} held out")
    warning = check_tokens(d.template, tokenizer, d.force_template)
    if warning:
        log(warning)
    if d.train_on_prompt:
        log(f"warning: data.train_on_prompt has no effect with train.objective={cfg.train.objective}: the "
            "preference objectives compare the answers, and the prompt is never trained")
    train, tstats = encode_records(train_recs, tokenizer, d, skipped)
    held, estats = encode_records(held_recs, tokenizer, d, skipped)
    _report(tstats, estats, skipped or [], read_bad, d, log)
    warning = special_warning(tstats, tokenizer, d)
    if warning:
        log(warning)
    if not train:
        raise DataError(f"{d.train}: no training record could be encoded; the first: {skipped[read_bad]['reason']}")
    return BuiltPairs(train, held, tstats, estats, skipped or [])


__all__ = ["BuiltPairs", "EncodedPair", "PairStats", "PrefRecord", "build_pairs", "encode_record", "encode_records",
           "for_objective", "read_split", "unpair"]
