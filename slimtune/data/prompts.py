"""GRPO's records: prompts with an optional reference answer, read through the guarded readers and rendered with
the chat template up to the assistant's header, as generation sees them.

Formats: alpaca (instruction/input; output, when present, is the reference answer), messages/sharegpt (a last
assistant turn, when present, is the reference answer) and {"prompt", "answer"}."""
from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from . import readers
from .checks import skip_entry
from .encode import prompt_ids
from .readers import DataError, Example
from .templates import RecordTemplateError, check_tokens, render

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class PromptRecord:
    """One prompt as the GRPO step samples from it."""
    prompt_ids: list[int]  # the rendered prompt, ending with the assistant's header
    text: str  # the last user turn: what rewards get as the prompt
    answer: str | None  # the reference answer, if the record has one
    where: str  # "train.jsonl line 17"


@dataclass
class BuiltPrompts:
    train: list[PromptRecord]
    skipped: list[dict] = field(default_factory=list)  # {"where", "reason", "record"} of each record left out


def reference(raw: Any, where: str) -> str | None:
    """The reference answer of a raw record: alpaca's output, the chat's last assistant turn, or "answer"."""
    if not isinstance(raw, dict):
        return None
    if "prompt" in raw and "answer" in raw and "instruction" not in raw:
        value, name = raw["answer"], "answer"
    elif "output" in raw:
        value, name = raw["output"], "output"
    else:
        turns = raw.get("messages") or raw.get("conversations") or []
        last = turns[-1] if turns else {}
        if not isinstance(last, dict) or (last.get("role") or last.get("from")) not in ("assistant", "gpt"):
            return None
        value, name = last.get("content", last.get("value")), "the last assistant turn"
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f'{where}: field "{name}" must be a string (the reference answer), got {type(value).__name__}')
    return str(value)


def _encode(ex: Example, tokenizer: PreTrainedTokenizerBase, cfg_data: Any, needs_answer: bool) -> PromptRecord:
    messages = [{"role": "system", "content": cfg_data.system}] + ex.messages \
        if cfg_data.system and ex.messages[0]["role"] != "system" else ex.messages
    answer = reference(ex.raw, ex.where)
    if needs_answer and not (answer or "").strip():
        raise DataError(f"{ex.where}: no reference answer (alpaca output, a last assistant turn or \"answer\"), "
                        "which the rewards contains, equals and numeric compare with; add one or choose other rewards")
    try:
        ids = prompt_ids(render(cfg_data.template, messages, tokenizer, add_generation_prompt=True), tokenizer,
                         cfg_data.allow_special_tokens)
    except RecordTemplateError as err:
        raise RecordTemplateError(f"{ex.where}: {err}") from None
    if len(ids) > cfg_data.max_len:
        raise DataError(f"{ex.where}: the prompt is {len(ids)} tokens, more than data.max_len={cfg_data.max_len}; "
                        "shorten it or raise data.max_len (completions come on top: grpo.max_new_tokens)")
    user = next((m["content"] for m in reversed(ex.messages) if m["role"] == "user"), "")
    return PromptRecord(ids, user, answer, ex.where)


def build_prompts(cfg_data: Any, tokenizer: PreTrainedTokenizerBase, needs_answer: bool,
                  log: Callable[[str], None] = print) -> BuiltPrompts:
    """Every prompt of data.train, checked and rendered; data.on_bad_record=skip lists bad ones instead."""
    skipped: list[dict] | None = [] if cfg_data.on_bad_record == "skip" else None
    examples = readers.read(cfg_data.train, cfg_data.format, cfg_data.limit, skipped, log, prompts=True,
                            answers=True)
    if warning := check_tokens(cfg_data.template, tokenizer, cfg_data.force_template):
        log(warning)
    out = []
    for ex in examples:
        try:
            out.append(_encode(ex, tokenizer, cfg_data, needs_answer))
        except (DataError, RecordTemplateError) as err:
            if skipped is None:
                raise
            skipped.append(skip_entry(ex.where, str(err), ex.raw))
    if not out:
        raise DataError(f"{cfg_data.train}: no prompt could be used; the first: {skipped[0]['reason']}")
    answered = sum(r.answer is not None for r in out)
    log(f"read {len(out)} prompts from {cfg_data.train} ({answered} with a reference answer)"
        + (f"; skipped {len(skipped)} bad records (data.on_bad_record=skip)" if skipped else ""))
    return BuiltPrompts(out, skipped or [])


def fingerprint(records: list[PromptRecord]) -> dict:
    """What a resume checks: every prompt's tokens and reference answer."""
    h = hashlib.sha256()
    for r in records:
        h.update(array("q", r.prompt_ids).tobytes() + b"|" + repr(r.answer).encode() + b"\n")
    return {"records": len(records), "sha256": h.hexdigest()}
