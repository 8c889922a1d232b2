"""Chat templates: a conversation to text, with the character spans of the answers that are trained.

Each answer span covers the assistant's text and the end-of-turn token after it (the EOS, or the
family's own end token such as <|eot_id|> or <|im_end|>), so the model learns to stop. Where a
family's answer header ends with a space ("[/INST] ", "Assistant: "), that space starts the span and
the generation prompt stops before it: tokenizers join it to the answer's first word ("ĠThe").

`auto` uses the tokenizer's own `chat_template`. Where a template writes something after the final
end-of-turn token (ChatML and SmolLM2 write "<|im_end|>\\n"), a training record stops at that token:
the trailing newline is dropped, so every encoded record ends with its EOS.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Rendered:
    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)  # [start, end) of each trained answer


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    """A fixed template: strings around each turn. {bos}/{eos} are the tokenizer's special tokens."""
    name: str
    prefix: str  # text before the first turn
    system: str  # format of the system message, with {content}
    user_first: str  # format of the first user turn (after the system part), ends with the answer header
    user_next: str  # format of later user turns
    answer_end: str  # text after each answer: the end-of-turn token; trained with the answer
    after_answer: str = ""  # text between an answer's end token and the next turn (not trained)
    stop: str = "{eos}"  # the token generation stops on
    system_inside_user: bool = False  # llama2 puts <<SYS>> inside the first [INST]


FAMILIES = {
    "llama2": Family(
        name="llama2", prefix="", system="<<SYS>>\n{content}\n<</SYS>>\n\n",
        user_first="{bos}[INST] {system}{content} [/INST] ", user_next="{bos}[INST] {content} [/INST] ",
        answer_end=" {eos}", system_inside_user=True,
    ),
    "llama3": Family(
        name="llama3", prefix="<|begin_of_text|>",
        system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
        user_first="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n",
        user_next="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
        answer_end="<|eot_id|>", stop="<|eot_id|>",
    ),
    # As ChatGLM3's build_chat_input: role token, "\n" (sentencepiece writes it " \n"), content.
    "chatglm3": Family(
        name="chatglm3", prefix="[gMASK]sop", system="<|system|> \n{content}",
        user_first="<|user|> \n{content}<|assistant|> \n", user_next="<|user|> \n{content}<|assistant|> \n",
        answer_end="{eos}",
    ),
    "bloom": Family(
        name="bloom", prefix="", system="{content}\n\n",
        user_first="Human: {content}\n\nAssistant: ", user_next="\n\nHuman: {content}\n\nAssistant: ",
        answer_end="{eos}",
    ),
    "chatml": Family(
        name="chatml", prefix="", system="<|im_start|>system\n{content}<|im_end|>\n",
        user_first="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        user_next="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
        answer_end="<|im_end|>", after_answer="\n", stop="<|im_end|>",
    ),
}

NAMES = ("auto", *FAMILIES)


def _special(tokenizer) -> dict[str, str]:
    return {"bos": getattr(tokenizer, "bos_token", None) or "", "eos": getattr(tokenizer, "eos_token", None) or ""}


def _render_family(fam: Family, messages: list[dict], tokenizer, add_generation_prompt: bool) -> Rendered:
    tok = _special(tokenizer)
    system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
    turns = messages[1:] if system or (messages and messages[0]["role"] == "system") else messages
    text = fam.prefix.format(**tok)
    if system and not fam.system_inside_user:
        text += fam.system.format(content=system, **tok)
    spans, first = [], True
    for m in turns:
        if m["role"] == "user":
            fmt = fam.user_first if first else fam.user_next
            sys_part = fam.system.format(content=system, **tok) if (first and system) else ""
            text += fmt.format(content=m["content"], system=sys_part, **tok)
            first = False
        else:
            # A header's final space ("[/INST] ", "Assistant: ") belongs to the answer: tokenizers join it
            # to the first word ("ĠThe", "▁The"), so the generation prompt stops before it and it is trained.
            start = len(text.rstrip(" "))
            text += m["content"] + fam.answer_end.format(**tok)
            spans.append((start, len(text)))
            text += fam.after_answer
    if not add_generation_prompt and spans and fam.after_answer and text.endswith(fam.after_answer):
        text = text[: len(text) - len(fam.after_answer)]
    if add_generation_prompt:  # a prompt ending in a bare space token asks for a split never trained on
        text = text.rstrip(" ")
    return Rendered(text, spans)


def _apply(tokenizer, messages, add_generation_prompt) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _end_token(tokenizer, rest: str) -> str:
    """The special token that ends an answer in the tokenizer's template, or "" if it writes none.

    Llama-2's template writes " </s>": the EOS after whitespace also ends the answer (with its
    whitespace), else the EOS would be inserted and the template's own " </s>" kept as well.
    """
    candidates = [tokenizer.eos_token] + list(getattr(tokenizer, "all_special_tokens", []))
    # tokenizer.json's special tokens too: Llama-3 base lists <|eot_id|> only there, not as a named one
    candidates += [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special]
    for tok in candidates:
        if tok and rest.startswith(tok):
            return tok
    eos, after_space = tokenizer.eos_token, rest.lstrip()
    if eos and after_space != rest and after_space.startswith(eos):
        return rest[: len(rest) - len(after_space) + len(eos)]
    return ""


def _render_auto(messages: list[dict], tokenizer, add_generation_prompt: bool) -> Rendered:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("template 'auto': this tokenizer has no chat_template; choose data.template "
                            f"from {', '.join(FAMILIES)}")
    if add_generation_prompt:
        return Rendered(_apply(tokenizer, messages, True))
    full = _apply(tokenizer, messages, False)
    text, spans, pos = "", [], 0  # text is rebuilt from `full`, inserting an EOS where none is written
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = _apply(tokenizer, messages[:i], True)
        if not full.startswith(prefix) or len(prefix) < pos:
            raise TemplateError("template 'auto': the tokenizer's chat_template renders earlier turns "
                                "differently once later turns follow; choose an explicit data.template")
        start = full.find(m["content"], len(prefix))
        if start < 0:
            raise TemplateError("template 'auto': the chat_template changes the assistant's text; choose an "
                                "explicit data.template")
        end = start + len(m["content"])
        end_tok = _end_token(tokenizer, full[end:])
        text += full[pos:end]
        span_start = len(text) - (end - len(prefix))  # the answer begins right after the generation prompt
        text += end_tok or tokenizer.eos_token  # a template that writes no end token still gets the EOS
        spans.append((span_start, len(text)))
        pos = end + len(end_tok)
    # what the template writes after the final end token (e.g. "\n") is dropped
    return Rendered(text, spans)


def render(name: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> Rendered:
    """Render a conversation; with add_generation_prompt the text ends with the answer header."""
    if name == "auto":
        return _render_auto(messages, tokenizer, add_generation_prompt)
    if name not in FAMILIES:
        raise TemplateError(f"unknown template {name!r}; choose one of {', '.join(NAMES)}")
    return _render_family(FAMILIES[name], messages, tokenizer, add_generation_prompt)


def _auto_stop(tokenizer) -> str:
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


def stop_tokens(name: str, tokenizer) -> list[str]:
    """Token strings that end an answer: generation stops on any of them."""
    stops = [tokenizer.eos_token] if getattr(tokenizer, "eos_token", None) else []
    if name in FAMILIES:
        stops.append(FAMILIES[name].stop.format(**_special(tokenizer)))
    elif name == "auto" and getattr(tokenizer, "chat_template", None):
        stops.append(_auto_stop(tokenizer))
    return [s for i, s in enumerate(stops) if s and s not in stops[:i]]
