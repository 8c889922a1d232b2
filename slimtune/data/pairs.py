"""Preference records, encoded: a prompt rendered once with the chat template (masked) and the answers that are
trained (chosen and rejected of a pair, or one completion with a desirable/undesirable label for KTO).

The engine trains on these; data/preference.py reads and encodes them from the user's files."""
from __future__ import annotations

from dataclasses import dataclass, field

from .encode import IGNORE, Encoded


@dataclass
class EncodedPair:
    """One preference record. For a pair, `chosen` and `rejected` both follow `prompt`; for KTO's unpaired
    records `rejected` is empty and `label` says whether `chosen` is desirable (True) or not (False)."""
    prompt: list[int]  # the rendered prompt (history and the assistant header), never trained
    chosen: list[int]  # the chosen answer's tokens, its end-of-turn/EOS included
    rejected: list[int]  # the rejected answer's tokens (empty for an unpaired KTO record)
    where: str = ""  # file and record, for messages
    label: bool | None = None  # KTO: desirable or not; None for a pair
    truncated: bool = False  # longer than data.max_len before cutting (the prompt is cut from the left first)
    prompt_cut: int = 0  # prompt tokens cut on the left to fit data.max_len
    answer_cut: bool = False  # an answer was cut on the right (it lost its end token)
    special_text: int = 0  # control-token texts inside the messages, encoded as plain text

    @property
    def paired(self) -> bool:
        return self.label is None

    def sequence(self, answer: list[int]) -> Encoded:
        """prompt + answer as one trained sequence: the prompt masked with -100, the answer trained."""
        return Encoded(self.prompt + answer, [IGNORE] * len(self.prompt) + list(answer), where=self.where)

    def chosen_sequence(self) -> Encoded:
        return self.sequence(self.chosen)

    def rejected_sequence(self) -> Encoded:
        return self.sequence(self.rejected)


@dataclass
class PairStats:
    records: int = 0
    truncated: int = 0  # records cut to data.max_len
    prompt_cut: int = 0  # records whose prompt lost tokens on the left
    answer_cut: int = 0  # records whose answers were cut on the right (after the prompt was cut all it may be)
    identical: int = 0  # pairs whose chosen and rejected are the same tokens
    empty: int = 0  # pairs where an answer has no token
    desirable: int = 0  # KTO: records labelled true
    undesirable: int = 0  # KTO: records labelled false
    tokens: int = 0  # prompt + chosen + rejected tokens
    first_bad: list[str] = field(default_factory=list)  # where the first identical/empty pairs are
    special_records: int = 0  # records holding control-token text in their messages


@dataclass
class BuiltPairs:
    train: list[EncodedPair]
    eval: list[EncodedPair]
    train_stats: PairStats
    eval_stats: PairStats
    skipped: list[dict] = field(default_factory=list)  # {"where", "reason", "record"} of each record left out
