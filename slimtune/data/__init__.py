"""Data: read records, render them with a chat template, encode with masks, split train/eval."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .encode import Encoded, Stats, encode
from .readers import DataError, Example, read
from .templates import render


@dataclass
class Built:
    train: list[Encoded]
    eval: list[Encoded]
    train_stats: Stats
    eval_stats: Stats


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
    """Read, split and encode; print what was read and truncated; drop only records with no answer left."""
    examples = read(cfg_data.train, cfg_data.format, cfg_data.limit)
    if cfg_data.eval:
        train_ex, eval_ex = examples, read(cfg_data.eval, cfg_data.format)
    else:
        train_ex, eval_ex = split(examples, cfg_data.eval_size, cfg_data.seed)
    log(f"read {len(examples)} records from {cfg_data.train}"
        + (f" and {len(eval_ex)} from {cfg_data.eval}" if cfg_data.eval else
           f"; held out {len(eval_ex)} for eval"))
    train, tstats = encode_examples(train_ex, tokenizer, cfg_data)
    held, estats = encode_examples(eval_ex, tokenizer, cfg_data)
    log(tstats.summary("train", cfg_data.max_len))
    if held:
        log(estats.summary("eval", cfg_data.max_len))
    train, held = _drop_empty(train, "train", log), _drop_empty(held, "eval", log)
    if not train:
        raise DataError(f"{cfg_data.train}: no training record has an answer token left within "
                        f"data.max_len={cfg_data.max_len}; raise data.max_len")
    return Built(train, held, tstats, estats)


def _drop_empty(records: list[Encoded], name: str, log) -> list[Encoded]:
    kept, lost = [], []
    for r in records:
        (kept if any(x != -100 for x in r.labels) else lost).append(r)
    if lost:
        lost = [r.where for r in lost]
        log(f"{name}: {len(lost)} records have no trained token left after truncation and are not used "
            f"(first: {lost[0]})")
    return kept


__all__ = ["Built", "DataError", "Encoded", "Example", "build", "encode_examples", "read", "render", "split"]
