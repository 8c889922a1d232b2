"""Rendered text to input_ids and labels: prompt tokens are -100, answers and their EOS are trained.

Labels come from the answer spans' character offsets, never from token ids, so an EOS that equals
the pad token is still trained. Records longer than max_len are cut on the right and counted.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .templates import Rendered

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    where: str = ""
    truncated: bool = False  # longer than max_len before cutting
    lost_eos: bool = False  # the final answer's end token was cut off
    lost_answer: bool = False  # every trained token was cut off


@dataclass
class Stats:
    records: int = 0
    truncated: int = 0
    lost_eos: int = 0
    lost_answer: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    lengths: list[int] = field(default_factory=list)

    def add(self, enc: Encoded) -> None:
        self.records += 1
        self.truncated += enc.truncated
        self.lost_eos += enc.lost_eos
        self.lost_answer += enc.lost_answer
        self.tokens += len(enc.input_ids)
        self.trained_tokens += sum(1 for x in enc.labels if x != IGNORE)
        self.lengths.append(len(enc.input_ids))

    def summary(self, name: str, max_len: int) -> str:
        return (f"{name}: {self.records} records, {self.tokens} tokens ({self.trained_tokens} trained); "
                f"{self.truncated} truncated at max_len={max_len}, of which {self.lost_eos} lost their EOS "
                f"and {self.lost_answer} lost their whole answer")


def encode(rendered: Rendered, tokenizer, max_len: int, train_on_prompt: bool = False, where: str = "") -> Encoded:
    """Tokenize the whole text once (so ids equal the template's own tokenization) and label by spans."""
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    # a token is trained when it overlaps an answer span: a token straddling the boundary ("▁Hi" after
    # "[/INST]") produces the answer's first characters, so it belongs to the answer.
    answer = [any(a < e and b > s for s, e in rendered.spans) for a, b in offsets]
    labels = [tid if (ans or train_on_prompt) else IGNORE for tid, ans in zip(ids, answer)]
    truncated = len(ids) > max_len
    out = Encoded(ids[:max_len], labels[:max_len], where, truncated)
    if truncated:
        last = max((i for i, ans in enumerate(answer) if ans), default=-1)  # the final answer's end token
        out.lost_eos = last >= max_len
        out.lost_answer = not any(answer[:max_len])
    return out


def prompt_ids(rendered: Rendered, tokenizer) -> list[int]:
    """Token ids of a generation prompt (rendered with add_generation_prompt)."""
    return list(tokenizer(rendered.text, add_special_tokens=False)["input_ids"])
