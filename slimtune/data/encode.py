"""Rendered text to input_ids and labels: prompt tokens are -100, answers and their EOS are trained.

Labels come from the answer spans' character offsets, never from token ids, so an EOS that equals
the pad token is still trained. Records longer than max_len are cut on the right and counted.
Control-token text inside a message (`<|im_end|>` written in an answer) is encoded as plain text, and
counted, unless data.allow_special_tokens says it is meant as control tokens.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .templates import Rendered

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    where: str = ""
    truncated: bool = False  # longer than max_len before cutting
    lost_eos: bool = False  # the final answer's end token was cut off
    lost_answer: bool = False  # every trained token was cut off
    special_text: int = 0  # control-token texts inside the messages, encoded as plain text


@dataclass
class Stats:
    records: int = 0
    truncated: int = 0
    lost_eos: int = 0
    lost_answer: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    special_records: int = 0  # records holding control-token text in their messages
    first_special: str = ""  # the first of them
    guards: Any = None  # guards.Findings: the records each mask guard flagged

    def add(self, enc: Encoded) -> None:
        self.records += 1
        self.truncated += enc.truncated
        self.lost_eos += enc.lost_eos
        self.lost_answer += enc.lost_answer
        self.tokens += len(enc.input_ids)
        self.trained_tokens += sum(1 for x in enc.labels if x != IGNORE)
        self.lengths.append(len(enc.input_ids))
        if enc.special_text:
            self.special_records += 1
            self.first_special = self.first_special or enc.where

    def summary(self, name: str, max_len: int) -> str:
        return (f"{name}: {self.records} records, {self.tokens} tokens ({self.trained_tokens} trained); "
                f"{self.truncated} truncated at max_len={max_len}, of which {self.lost_eos} lost their EOS "
                f"and {self.lost_answer} lost their whole answer")


def _overlaps(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token, whether it overlaps a span. Tokens and spans both come in text order, so one sweep
    (testing every span per token was quadratic: 40 s for one 5,000-turn record)."""
    out, j = [], 0
    for a, b in offsets:
        while j < len(spans) and spans[j][1] <= a:
            j += 1
        out.append(j < len(spans) and spans[j][0] < b and a < spans[j][1])
    return out


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids of the tokenizer's control tokens (named ones and tokenizer.json's special added tokens)."""
    ids = set(getattr(tokenizer, "all_special_ids", []))
    ids.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    return ids


def _escape(text: str, ids: list[int], offsets: list, content: list[tuple[int, int]],
            tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list, int]:
    """Control-token text that came from the data (inside a message's own text, not the template's) encoded
    as the plain text it is: `<|im_end|>` in an answer must not end the turn. Returns ids, offsets, count."""
    special = special_ids(tokenizer)
    if not content or not special.intersection(ids):
        return ids, offsets, 0
    inside = _overlaps(offsets, content)
    out_ids, out_off, n = [], [], 0
    for tid, (a, b), ins in zip(ids, offsets, inside):
        if tid in special and ins:
            piece = tokenizer(text[a:b], add_special_tokens=False, split_special_tokens=True,
                              return_offsets_mapping=True)
            out_ids += piece["input_ids"]
            out_off += [(a + x, a + y) for x, y in piece["offset_mapping"]]
            n += 1
        else:
            out_ids.append(tid)
            out_off.append((a, b))
    return out_ids, out_off, n


def _tokens(rendered: Rendered, tokenizer: PreTrainedTokenizerBase,
            allow_special: bool) -> tuple[list[int], list, int]:
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    if allow_special:
        return ids, offsets, 0
    return _escape(rendered.text, ids, offsets, rendered.content, tokenizer)


def encode(rendered: Rendered, tokenizer: PreTrainedTokenizerBase, max_len: int, train_on_prompt: bool = False,
           where: str = "", allow_special: bool = False) -> Encoded:
    """Tokenize the whole text once (so ids equal the template's own tokenization) and label by spans.

    Args:
        allow_special: encode control-token text inside the messages (`<|im_end|>`) as the control token
            (data.allow_special_tokens); by default it is encoded as plain text, and counted.
    """
    ids, offsets, special = _tokens(rendered, tokenizer, allow_special)
    # a token is trained when it overlaps an answer span: a token straddling the boundary ("▁Hi" after
    # "[/INST]") produces the answer's first characters, so it belongs to the answer.
    answer = _overlaps(offsets, rendered.spans)
    labels = [tid if (ans or train_on_prompt) else IGNORE for tid, ans in zip(ids, answer)]
    truncated = len(ids) > max_len
    out = Encoded(ids[:max_len], labels[:max_len], where, truncated, special_text=special)
    if truncated:
        last = max((i for i, ans in enumerate(answer) if ans), default=-1)  # the final answer's end token
        out.lost_eos = last >= max_len
        out.lost_answer = not any(answer[:max_len])
    return out


def prompt_ids(rendered: Rendered, tokenizer: PreTrainedTokenizerBase, allow_special: bool = False) -> list[int]:
    """Token ids of a generation prompt (rendered with add_generation_prompt), control-token text in the
    messages escaped as in training."""
    return _tokens(rendered, tokenizer, allow_special)[0]


def segments(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive runs of prompt (False) and trained (True) tokens, as `slimtune inspect` and the web app
    show a record."""
    out: list[tuple[bool, list[int]]] = []
    for tid, lab in zip(ids, labels):
        trained = lab != IGNORE
        if out and out[-1][0] == trained:
            out[-1][1].append(tid)
        else:
            out.append((trained, [tid]))
    return out
