"""Mask guards: what a template's answer spans must give every encoded record, checked before the model loads.

A run refuses to start, naming the template and the first records, when a record trains nothing, trains every
token although it has a prompt (and data.train_on_prompt is off), leaves the end-of-turn token of an answer
out of training (the model would never learn to stop), or holds reasoning the template drops (Qwen3's
thinking template writes no <think> block for answers before the last user message). `slimtune inspect`
prints the same findings instead of refusing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .checks import DataError
from .encode import IGNORE, Encoded, segments
from .families import FAMILIES, drop_think, earlier_thinking
from .templates import stop_ids

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SHOWN = 3  # records named per guard

WHAT = {
    "empty": ("no trained token (the template's answer spans are empty)",
              "check the answers are not empty and that data.template marks them (slimtune inspect shows the spans)"),
    "all": ("every token trained although the record has a prompt",
            "the template marks the prompt as answer: fix it or choose another data.template (set "
            "data.train_on_prompt=true if training on prompts is meant)"),
    "eos": ("an answer whose end-of-turn token is not trained (the model would not learn to stop)",
            "choose a data.template whose answers end with the tokenizer's end token (slimtune inspect shows it)"),
    "think": ("<think> reasoning in answers before the last user message, which the template drops (as Qwen3's "
              "chat template does): only the reasoning after the last user message would be trained",
              "set data.think_history=drop to train that way, or data.think_history=keep (with data.template="
              "qwen3-thinking) to keep and train every answer's reasoning as written"),
}


@dataclass
class Findings:
    """Records each guard flagged, by kind (WHAT's keys), in the order met."""
    template: str
    records: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, where: str) -> None:
        self.records.setdefault(kind, []).append(where)

    def merge(self, other: Findings | None) -> None:
        for kind, wheres in (other.records if other else {}).items():
            self.records.setdefault(kind, []).extend(wheres)

    def lines(self) -> list[str]:
        out = []
        for kind, wheres in self.records.items():
            what, fix = WHAT[kind]
            first = ", ".join(wheres[:SHOWN]) + (f" and {len(wheres) - SHOWN} more" if len(wheres) > SHOWN else "")
            out.append(f"data.template={self.template}: {len(wheres)} record{'s' * (len(wheres) != 1)} with {what} "
                       f"({first}); {fix}")
        return out

    def refuse(self) -> None:
        """Raise one DataError listing every guard that flagged a record."""
        if self.records:
            raise DataError("; ".join(self.lines()))


def drops_think(template: str, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the template drops the reasoning of answers before the last user message."""
    if template == "auto":
        return "</think>" in (getattr(tokenizer, "chat_template", None) or "")
    return template in FAMILIES and FAMILIES[template].think


def think_messages(messages: list[dict], template: str, tokenizer: PreTrainedTokenizerBase, choice: str,
                   where: str, found: Findings | None) -> tuple[list[dict], bool]:
    """(messages to render, keep_think) under data.think_history: an earlier answer's reasoning that the
    template would drop is flagged (error), removed as the template does (drop) or kept (keep)."""
    earlier = earlier_thinking(messages) if drops_think(template, tokenizer) else []
    if not earlier:
        return messages, False
    if choice == "keep":
        return messages, True
    if choice == "error" and found is not None:
        found.add("think", where)
    return [{**m, "content": drop_think(m["content"])} if i in earlier else m for i, m in enumerate(messages)], False


def check_choice(template: str, tokenizer: PreTrainedTokenizerBase, choice: str) -> None:
    """data.think_history=keep needs a template that can keep earlier reasoning: refuse it for `auto`."""
    if choice == "keep" and template == "auto" and drops_think(template, tokenizer):
        raise DataError("data.think_history=keep with data.template=auto: the tokenizer's chat_template drops the "
                        "reasoning of answers before the last user message; use data.template=qwen3-thinking to "
                        "keep it")


def stop_set(template: str, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Ids an answer may end with: the EOS and the template's end-of-turn tokens."""
    return set(stop_ids(template, tokenizer))


def check(enc: Encoded, has_prompt: bool, train_on_prompt: bool, stops: set[int]) -> list[str]:
    """The guards (WHAT's keys) one encoded record fails."""
    trained = [x != IGNORE for x in enc.labels]
    if not any(trained):
        return [] if enc.lost_answer else ["empty"]
    if train_on_prompt:
        return []
    kinds = ["all"] if has_prompt and all(trained) else []
    runs = [ids for is_trained, ids in segments(enc.input_ids, enc.labels) if is_trained]
    if enc.truncated and trained[-1]:
        runs = runs[:-1]  # the last answer was cut at data.max_len: its end token is gone, and counted
    if stops and any(run[-1] not in stops for run in runs):
        kinds.append("eos")
    return kinds
