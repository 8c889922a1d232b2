"""The fixed chat-template families: the strings around each turn, as each model family's own template writes them.

Each answer span covers the assistant's text and the family's end-of-turn token, so the model learns to stop.
Qwen3's templates handle reasoning: its thinking template writes each answer after the last user message as
`<think>\\n{reasoning}\\n</think>\\n\\n{answer}` (an empty block when the record has none) and drops the
reasoning of answers before it; in non-thinking mode the generation prompt ends with the empty block, which
`qwen3` therefore puts in every answer header (not trained), so every answer is trained after the exact text
the model is given at inference.
"""
from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


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
    system_inside_user: bool = False  # llama2 and gemma3 put the system text inside the first user turn
    controls: tuple[str, ...] = ()  # control tokens the tokenizer must hold as single tokens
    think: bool = False  # Qwen3's thinking template: answers carry <think>...</think> blocks (see the module doc)


def _chatml(name: str, header: str = "", qwen3: bool = False, think: bool = False) -> Family:
    user = "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n" + header
    controls = ("<|im_start|>", "<|im_end|>") + ((THINK_OPEN, THINK_CLOSE) if qwen3 else ())
    return Family(name=name, prefix="", system="<|im_start|>system\n{content}<|im_end|>\n", user_first=user,
                  user_next=user, answer_end="<|im_end|>", after_answer="\n", stop="<|im_end|>",
                  controls=controls, think=think)


_GEMMA_USER = "<start_of_turn>user\n{system}{content}<end_of_turn>\n<start_of_turn>model\n"
_PHI3_USER = "<|user|>\n{content}<|end|>\n<|assistant|>\n"
_PHI4_USER = "<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>"

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
        controls=("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    # As ChatGLM3's build_chat_input: role token, "\n" (sentencepiece writes it " \n"), content.
    "chatglm3": Family(
        name="chatglm3", prefix="[gMASK]sop", system="<|system|> \n{content}",
        user_first="<|user|> \n{content}<|assistant|> \n", user_next="<|user|> \n{content}<|assistant|> \n",
        answer_end="{eos}", controls=("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>"),
    ),
    "bloom": Family(
        name="bloom", prefix="", system="{content}\n\n",
        user_first="Human: {content}\n\nAssistant: ", user_next="\n\nHuman: {content}\n\nAssistant: ",
        answer_end="{eos}",
    ),
    "chatml": _chatml("chatml"),
    # Gemma 3: assistant turns are the "model" role; the system text opens the first user turn, then a blank line.
    "gemma3": Family(
        name="gemma3", prefix="{bos}", system="{content}\n\n", user_first=_GEMMA_USER,
        user_next=_GEMMA_USER.replace("{system}", ""), answer_end="<end_of_turn>", after_answer="\n",
        stop="<end_of_turn>", system_inside_user=True, controls=("<start_of_turn>", "<end_of_turn>"),
    ),
    # Phi-3 / Phi-3.5 mini: its template also writes the EOS after a whole conversation; training stops at <|end|>.
    "phi3": Family(
        name="phi3", prefix="", system="<|system|>\n{content}<|end|>\n", user_first=_PHI3_USER,
        user_next=_PHI3_USER, answer_end="<|end|>", after_answer="\n", stop="<|end|>",
        controls=("<|user|>", "<|assistant|>", "<|end|>"),
    ),
    "phi4": Family(
        name="phi4", prefix="", system="<|im_start|>system<|im_sep|>{content}<|im_end|>", user_first=_PHI4_USER,
        user_next=_PHI4_USER, answer_end="<|im_end|>", stop="<|im_end|>",
        controls=("<|im_start|>", "<|im_sep|>", "<|im_end|>"),
    ),
    "qwen3": _chatml("qwen3", header="<think>\n\n</think>\n\n", qwen3=True),
    "qwen3-thinking": _chatml("qwen3-thinking", qwen3=True, think=True),
}


def split_think(content: str) -> tuple[str, str] | None:
    """(reasoning, answer) of an answer holding a </think> block, as Qwen3's template splits it; else None."""
    if THINK_CLOSE not in content:
        return None
    head, answer = content.split(THINK_CLOSE)[0], content.split(THINK_CLOSE)[-1]
    return head.rstrip("\n").split(THINK_OPEN)[-1].lstrip("\n"), answer.lstrip("\n")


def drop_think(content: str) -> str:
    """The answer without its reasoning block, as Qwen3's template writes answers before the last user message."""
    parts = split_think(content)
    return parts[1] if parts else content


def with_think(content: str) -> str:
    """An answer after the last user message as Qwen3's thinking template writes it: its reasoning block
    (an empty one when it has none) in the template's own layout, then the answer."""
    reasoning, answer = split_think(content) or ("", content)
    return f"{THINK_OPEN}\n{reasoning.strip(chr(10))}\n{THINK_CLOSE}\n\n{answer.lstrip(chr(10))}"


def earlier_thinking(messages: list[dict]) -> list[int]:
    """Indices of answers before the last user message that hold a </think> block (Qwen3's template drops it)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    return [i for i, m in enumerate(messages[:last_user])
            if m["role"] == "assistant" and THINK_CLOSE in m["content"]]


def think_turns(turns: list[dict], keep_history: bool = False) -> list[dict]:
    """The turns as Qwen3's thinking template writes them (keep_history: earlier reasoning kept as written)."""
    last_user = max((i for i, m in enumerate(turns) if m["role"] == "user"), default=-1)
    out = []
    for i, m in enumerate(turns):
        if m["role"] == "assistant" and i > last_user:
            m = {**m, "content": with_think(m["content"])}
        elif m["role"] == "assistant" and not keep_history:
            m = {**m, "content": drop_think(m["content"])}
        out.append(m)
    return out
