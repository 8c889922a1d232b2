"""Chat templates: a conversation to text, with the character spans of the answers that are trained.

Each answer span covers the assistant's text and the end-of-turn token after it (the EOS, or the
family's own end token such as <|eot_id|> or <|im_end|>), so the model learns to stop. The fixed families
(llama2, llama3, chatglm3, bloom, chatml, gemma3, phi3, phi4, qwen3, qwen3-thinking) live in families.py. Where a
family's answer header ends with a space ("[/INST] ", "Assistant: "), that space starts the span and
the generation prompt stops before it: tokenizers join it to the answer's first word ("ĠThe").

`auto` uses the tokenizer's own `chat_template`. Where a template writes something after the final
end-of-turn token (ChatML and SmolLM2 write "<|im_end|>\\n"), a training record stops at that token:
the trailing newline is dropped, so every encoded record ends with its EOS. Its answers are found in
time linear in the turns: one render, one render with markers in place of the texts (which also says
where each message's own text lies), and one generation-prompt render per change of answer header.

A fixed family needs its control tokens to be single tokens of the tokenizer (`check_tokens`).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SlimtuneError
from . import sandbox
from .families import FAMILIES, Family, think_turns

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each trained answer
    content: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each message's own text


class TemplateError(SlimtuneError, ValueError):
    """The template cannot be used with this tokenizer (no chat_template, unsafe or broken Jinja, ...)."""


class RecordTemplateError(TemplateError):
    """The template cannot render one record (others may render): data.on_bad_record=skip skips it."""


NAMES = ("auto", *FAMILIES)


def _special(tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    return {"bos": getattr(tokenizer, "bos_token", None) or "", "eos": getattr(tokenizer, "eos_token", None) or ""}


def _fill(fmt: str, content: str, **kw: str) -> tuple[str, int]:
    """fmt filled in, and where the content starts in it."""
    return fmt.format(content=content, **kw), len(fmt.split("{content}", 1)[0].format(**kw))


def _render_family(fam: Family, messages: list[dict], tokenizer: PreTrainedTokenizerBase,
                   add_generation_prompt: bool, keep_think: bool = False) -> Rendered:
    tok = _special(tokenizer)
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if system or (messages and messages[0]["role"] == "system") else messages
    if fam.think:
        turns = think_turns(turns, keep_think)
    text, content = fam.prefix.format(**tok), []
    if system and not fam.system_inside_user:
        piece, at = _fill(fam.system, system, **tok)
        content.append((len(text) + at, len(text) + at + len(system)))
        text += piece
    spans, first = [], True
    for m in turns:
        if m["role"] == "user":
            fmt = fam.user_first if first else fam.user_next
            sys_part = fam.system.format(content=system, **tok) if (first and system) else ""
            if sys_part and fam.system_inside_user:
                at = len(text) + fmt.index("{system}") + len(fam.system.split("{content}", 1)[0])
                content.append((at, at + len(system)))
            piece, at = _fill(fmt, m["content"], system=sys_part, **tok)
            content.append((len(text) + at, len(text) + at + len(m["content"])))
            text += piece
            first = False
        else:
            # A header's final space ("[/INST] ", "Assistant: ") belongs to the answer: tokenizers join it
            # to the first word ("ĠThe", "▁The"), so the generation prompt stops before it and it is trained.
            # (Only the tail is looked at: stripping the whole text per answer would be quadratic.)
            tail = text[-64:]
            start = len(text) - len(tail) + len(tail.rstrip(" "))
            content.append((len(text), len(text) + len(m["content"])))
            text += m["content"] + fam.answer_end.format(**tok)
            spans.append((start, len(text)))
            text += fam.after_answer
    if not add_generation_prompt and spans and fam.after_answer and text.endswith(fam.after_answer):
        text = text[: len(text) - len(fam.after_answer)]
    if add_generation_prompt:  # a prompt ending in a bare space token asks for a split never trained on
        text = text.rstrip(" ")
    return Rendered(text, spans, content)


def _template_file(tokenizer: PreTrainedTokenizerBase) -> str:
    """Where the tokenizer's chat_template came from, for messages: its folder's file, or the folder."""
    folder = getattr(tokenizer, "name_or_path", "") or ""
    for name in ("chat_template.jinja", "tokenizer_config.json"):
        if folder and (Path(folder) / name).is_file():
            return str(Path(folder) / name)
    return f"{folder}: chat_template" if folder else "the tokenizer's chat_template"


def _apply(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    import jinja2

    fix = f"do not use this tokenizer's template: choose data.template from {', '.join(FAMILIES)}"

    def slow() -> TemplateError:
        return TemplateError(f"{_template_file(tokenizer)}: the chat_template ran past {sandbox.RENDER_SECONDS:g} s "
                             f"on one conversation of {len(messages)} messages; {fix}")

    try:
        with sandbox.time_limit(sandbox.RENDER_SECONDS, slow):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except jinja2.exceptions.SecurityError as err:  # transformers renders in jinja's sandbox, which stops it
        raise TemplateError(f"{_template_file(tokenizer)}: the chat_template tried an operation the sandbox "
                            f"forbids ({err}); {fix}") from None
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise TemplateError(f"{_template_file(tokenizer)}: the chat_template is not valid Jinja (template line "
                            f"{err.lineno}: {err.message}); fix it or choose data.template from "
                            f"{', '.join(FAMILIES)}") from None
    except jinja2.exceptions.TemplateError as err:  # the template's raise_exception(...): this record only
        raise RecordTemplateError(f"the chat_template refused this conversation: {err}") from None
    except (OverflowError, MemoryError, RecursionError) as err:  # the sandbox's range bound (100,000 items)
        raise TemplateError(f"{_template_file(tokenizer)}: the chat_template asks for more than the sandbox allows "
                            f"({type(err).__name__}: {err}); {fix}") from None


def _end_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The special tokens an answer may end with, the EOS first."""
    candidates = [tokenizer.eos_token] + list(getattr(tokenizer, "all_special_tokens", []))
    # tokenizer.json's special tokens too: Llama-3 base lists <|eot_id|> only there, not as a named one
    candidates += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    return [t for t in candidates if t]


def _end_token(candidates: list[str], eos: str, full: str, at: int) -> str:
    """The special token that ends an answer at full[at:] in the tokenizer's template, or "" if none.

    Llama-2's template writes " </s>": the EOS after whitespace also ends the answer (with its
    whitespace), else the EOS would be inserted and the template's own " </s>" kept as well.
    """
    for tok in candidates:
        if full.startswith(tok, at):
            return tok
    rest = full[at:at + 64]  # a bounded look: slicing the whole tail per answer would be quadratic
    after_space = rest.lstrip()
    if eos and after_space != rest and after_space.startswith(eos):
        return rest[: len(rest) - len(after_space) + len(eos)]
    return ""


def _exact_prompt_end(messages: list[dict], i: int, tokenizer: PreTrainedTokenizerBase, full: str, pos: int) -> int:
    """Where answer i starts in `full`, from rendering its own generation prompt (which must be a prefix
    of `full`: a template that renders earlier turns differently once later ones follow is refused)."""
    prefix = _apply(tokenizer, messages[:i], True)
    if not full.startswith(prefix) or len(prefix) < pos:
        raise RecordTemplateError("template 'auto': the tokenizer's chat_template renders earlier turns "
                                  "differently once later turns follow; choose an explicit data.template")
    return len(prefix)


def _prompt_ends(messages: list[dict], answers: list[int], tokenizer: PreTrainedTokenizerBase, full: str,
                 where: list[tuple[int, int]]) -> dict:
    """Where each answer starts in `full` (right after its generation prompt). Rendering every answer's
    prompt costs time quadratic in the turns (269 s for 5,000 pairs), so only the first is rendered, and
    any whose prompt does not end as the last rendered one did: the others are that header (what a prompt
    writes after the user's text) found right after their user's text, whose place `where` gives (from
    _auto_content; with [] every prompt is rendered)."""
    ends, pos, header = {}, 0, ""
    for i in answers:
        user_end = where[i - 1][1] if where and i and messages[i - 1]["role"] == "user" else -1
        if header and user_end >= pos and full.startswith(header, user_end):
            ends[i] = user_end + len(header)
        else:
            ends[i] = _exact_prompt_end(messages, i, tokenizer, full, pos)
            header = full[user_end:ends[i]] if 0 <= user_end <= ends[i] else ""
        pos = ends[i]
    return ends


def _render_auto(messages: list[dict], tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool) -> Rendered:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'auto': this tokenizer has no chat_template; choose data.template "
                            f"from {', '.join(FAMILIES)} ({_matching(tokenizer)})")
    if add_generation_prompt:
        text = _apply(tokenizer, messages, True)
        return Rendered(text, [], _auto_content(messages, tokenizer, text, True))
    full = _apply(tokenizer, messages, False)
    where = _auto_content(messages, tokenizer, full, False)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    prompt_ends = _prompt_ends(messages, answers, tokenizer, full, where)
    ends, eos = _end_tokens(tokenizer), tokenizer.eos_token
    text, spans, pos = "", [], 0  # text is rebuilt from `full`, inserting an EOS where none is written
    moved = []  # (offset in full, offset in text) where each copied piece starts
    for i in answers:
        gen_end, content = prompt_ends[i], messages[i]["content"]
        start = full.find(content, gen_end)
        if start < 0 or start < pos:
            raise RecordTemplateError("template 'auto': the chat_template changes the assistant's text (a "
                                      "template that trims answers, say); choose an explicit data.template")
        end = start + len(content)
        end_tok = _end_token(ends, eos, full, end)
        moved.append((pos, len(text)))
        text += full[pos:end]
        span_start = len(text) - (end - gen_end)  # the answer begins right after the generation prompt
        text += end_tok or eos  # a template that writes no end token still gets the EOS
        spans.append((span_start, len(text)))
        pos = end + len(end_tok)
    # what the template writes after the final end token (e.g. "\n") is dropped
    content = [_move(s, e, moved, len(text)) for s, e in where]
    return Rendered(text, spans, [c for c in content if c])


def _auto_content(messages: list[dict], tokenizer: PreTrainedTokenizerBase, full: str,
                  add_generation_prompt: bool) -> list[tuple[int, int]]:
    """Where each message's own text sits in `full` (control-token text there came from the data), from one
    render with a marker in place of each text. The markers, replaced by the texts, must give `full` back;
    a template that changes or repeats texts gives none (so nothing is escaped)."""
    marks = [f"\ue000{k}\ue001" for k in range(len(messages))]
    try:
        skeleton = _apply(tokenizer, [{**m, "content": mk} for m, mk in zip(messages, marks)], add_generation_prompt)
    except RecordTemplateError:  # a template that checks the texts themselves: the slow way, by rendering
        return []
    spans, parts, pos, at = [], [], 0, 0
    for m, mk in zip(messages, marks):
        found = skeleton.find(mk, pos)
        if found < 0:
            return []
        at += found - pos
        spans.append((at, at + len(m["content"])))
        parts += [skeleton[pos:found], m["content"]]
        at, pos = at + len(m["content"]), found + len(mk)
    parts.append(skeleton[pos:])
    return spans if "".join(parts) == full else []


def _move(s: int, e: int, moved: list[tuple[int, int]], size: int) -> tuple[int, int] | None:
    """A span of `full` in the rebuilt text's offsets (None: in the dropped tail)."""
    k = bisect.bisect_right(moved, (s, float("inf"))) - 1
    if k < 0:
        return None
    start = s - moved[k][0] + moved[k][1]
    return (start, start + e - s) if start + e - s <= size else None


def render(name: str, messages: list[dict], tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool = False,
           keep_think: bool = False) -> Rendered:
    """Render a conversation; with add_generation_prompt the text ends with the answer header.

    Args:
        keep_think: qwen3-thinking keeps the <think> blocks of answers before the last user message, which
            Qwen3's template drops (data.think_history=keep).
    """
    if name == "auto":
        return _render_auto(messages, tokenizer, add_generation_prompt)
    if name not in FAMILIES:
        raise TemplateError(f"unknown template {name!r}; choose one of {', '.join(NAMES)}")
    return _render_family(FAMILIES[name], messages, tokenizer, add_generation_prompt, keep_think)


def _single(tokenizer: PreTrainedTokenizerBase, text: str) -> bool:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1


def fitting(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """The families whose control tokens are all single tokens of this tokenizer (a Gemma 3 GGUF file carries
    no chat_template, but its <start_of_turn> and <end_of_turn> say gemma3)."""
    return [n for n, f in FAMILIES.items() if f.controls and all(_single(tokenizer, t) for t in f.controls)]


def _matching(tokenizer: PreTrainedTokenizerBase) -> str:
    """Which template suits this tokenizer, for messages."""
    if getattr(tokenizer, "chat_template", None):
        return "the tokenizer's own chat_template fits it: use data.template=auto"
    fits = fitting(tokenizer)
    if fits:
        return f"templates whose control tokens it has: {', '.join(fits)}"
    return "it has no family's control tokens: use a plain-text template (llama2 or bloom)"


def check_tokens(name: str, tokenizer: PreTrainedTokenizerBase, force: bool = False) -> str:
    """Refuse a family template whose control tokens are not single tokens of this tokenizer (ChatGLM3's
    [gMASK] on SmolLM2 becomes '[', 'g', 'M', 'ASK', ']'); with force, return that as a warning instead."""
    if name not in FAMILIES:
        return ""
    missing = [t for t in FAMILIES[name].controls if not _single(tokenizer, t)]
    if not missing:
        return ""
    msg = (f"data.template={name}: this tokenizer has no single token for {', '.join(missing)}, so the template "
           f"would be trained as pieces of text; {_matching(tokenizer)}")
    if force:
        return f"warning: {msg} (applied anyway: data.force_template=true)"
    raise TemplateError(f"{msg}; or set data.force_template=true to apply {name} anyway")


def _auto_stop(tokenizer: PreTrainedTokenizerBase) -> str:
    """The end token that `auto` trains after an answer: a chat_template may write its own (Qwen base
    tokenizers: EOS <|endoftext|>, template <|im_end|>), and generation must stop on it too."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    try:
        r = _render_auto(msgs, tokenizer, False)
    except Exception:  # a template that refuses this small conversation: stop on the EOS alone
        return ""
    s, e = r.spans[-1]
    answer = r.text[s:e]
    return answer[answer.index("ok") + 2:].strip()


def stop_tokens(name: str, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Token strings that end an answer: generation stops on any of them."""
    stops = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
    if name in FAMILIES:
        stops.append(FAMILIES[name].stop.format(**_special(tokenizer)))
    elif name == "auto" and getattr(tokenizer, "chat_template", None):
        stops.append(_auto_stop(tokenizer))
    return [s for i, s in enumerate(stops) if s and s not in stops[:i]]


def stop_ids(name: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids of stop_tokens in the tokenizer's vocabulary (generation, merge and GGUF export stop on them)."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens(name, tokenizer)]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]
