"""gemma3, phi3, phi4, qwen3 and qwen3-thinking: golden strings built by hand from each family's documented format,
the same text as the family's own chat template (official_templates.py) renders, and masks on exact token ids."""
from __future__ import annotations

import pytest
from official_templates import GEMMA3, PHI3, PHI4, QWEN3

from conftest import family_tokenizer
from slimtune.data.encode import IGNORE, encode
from slimtune.data.families import FAMILIES
from slimtune.data.templates import check_tokens, render, stop_tokens

SYS = {"role": "system", "content": "Be brief."}


def turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


# Six conversations (texts already trimmed: Gemma's template trims each message, the family writes it as is).
CONVS = [
    [turn("user", "Hello there!"), turn("assistant", "Hi. How are you today?")],
    [SYS, turn("user", "The capital of France?"), turn("assistant", "Paris.")],
    [SYS, turn("user", "Give three tips."), turn("assistant", "Sleep.\nWater.\nWalk."),
     turn("user", "One more?"), turn("assistant", "Eat well.")],
    [turn("user", "你好，世界。"), turn("assistant", "中文字符"), turn("user", "世界"), turn("assistant", "你好")],
    [turn("user", "Line one\nline two"), turn("assistant", "A {{ not jinja }} \"quoted\" answer")],
    [SYS, turn("user", "1 2 3"), turn("assistant", "4"), turn("user", "5 6"), turn("assistant", "7"),
     turn("user", "8"), turn("assistant", "9")],
]
EMPTY = "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def tok():
    t = family_tokenizer()
    t.bos_token, t.eos_token = "<bos>", "<eos>"
    return t


def with_template(tok, template: str):
    t = family_tokenizer(template)
    t.bos_token, t.eos_token = tok.bos_token, tok.eos_token
    return t


MULTI = CONVS[2]
GOLDEN = {
    "gemma3": ("<bos><start_of_turn>user\nBe brief.\n\nGive three tips.<end_of_turn>\n<start_of_turn>model\n"
               "Sleep.\nWater.\nWalk.<end_of_turn>\n<start_of_turn>user\nOne more?<end_of_turn>\n"
               "<start_of_turn>model\nEat well.<end_of_turn>",
               ["Sleep.\nWater.\nWalk.<end_of_turn>", "Eat well.<end_of_turn>"]),
    "phi3": ("<|system|>\nBe brief.<|end|>\n<|user|>\nGive three tips.<|end|>\n<|assistant|>\nSleep.\nWater.\nWalk."
             "<|end|>\n<|user|>\nOne more?<|end|>\n<|assistant|>\nEat well.<|end|>",
             ["Sleep.\nWater.\nWalk.<|end|>", "Eat well.<|end|>"]),
    "phi4": ("<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Give three tips.<|im_end|>"
             "<|im_start|>assistant<|im_sep|>Sleep.\nWater.\nWalk.<|im_end|><|im_start|>user<|im_sep|>One more?"
             "<|im_end|><|im_start|>assistant<|im_sep|>Eat well.<|im_end|>",
             ["Sleep.\nWater.\nWalk.<|im_end|>", "Eat well.<|im_end|>"]),
    "qwen3": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGive three tips.<|im_end|>\n"
              f"<|im_start|>assistant\n{EMPTY}Sleep.\nWater.\nWalk.<|im_end|>\n<|im_start|>user\nOne more?<|im_end|>\n"
              f"<|im_start|>assistant\n{EMPTY}Eat well.<|im_end|>",
              ["Sleep.\nWater.\nWalk.<|im_end|>", "Eat well.<|im_end|>"]),
    "qwen3-thinking": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGive three tips.<|im_end|>\n"
                       "<|im_start|>assistant\nSleep.\nWater.\nWalk.<|im_end|>\n<|im_start|>user\nOne more?"
                       f"<|im_end|>\n<|im_start|>assistant\n{EMPTY}Eat well.<|im_end|>",
                       ["Sleep.\nWater.\nWalk.<|im_end|>", f"{EMPTY}Eat well.<|im_end|>"]),
}
PROMPTS = {  # the generation prompt after MULTI's second question
    "gemma3": "<start_of_turn>user\nOne more?<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nOne more?<|end|>\n<|assistant|>\n",
    "phi4": "<|im_start|>user<|im_sep|>One more?<|im_end|><|im_start|>assistant<|im_sep|>",
    "qwen3": f"<|im_start|>user\nOne more?<|im_end|>\n<|im_start|>assistant\n{EMPTY}",
    "qwen3-thinking": "<|im_start|>user\nOne more?<|im_end|>\n<|im_start|>assistant\n",
}


@pytest.mark.parametrize("name", list(GOLDEN))
def test_golden_text_spans_and_prompt(name, tok):
    text, trained = GOLDEN[name]
    r = render(name, MULTI, tok)
    assert r.text == text
    assert [r.text[s:e] for s, e in r.spans] == trained
    prompt = render(name, MULTI[:-1], tok, add_generation_prompt=True).text
    assert prompt.endswith(PROMPTS[name]) and text.startswith(prompt)


# (family, the family's own template, what that template writes after the final answer's end token and
# training leaves out: Gemma's and ChatML's newline, Phi-3's newline and EOS)
OFFICIAL = [("gemma3", GEMMA3, "\n"), ("phi3", PHI3, "\n<eos>"), ("phi4", PHI4, ""), ("qwen3-thinking", QWEN3, "\n")]


@pytest.mark.parametrize("name,template,tail", OFFICIAL, ids=[o[0] for o in OFFICIAL])
@pytest.mark.parametrize("k", range(len(CONVS)))
def test_family_equals_its_own_chat_template(name, template, tail, k, tok):
    own, conv = with_template(tok, template), CONVS[k]
    assert own.apply_chat_template(conv, tokenize=False) == render(name, conv, tok).text + tail
    prompt = own.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    assert prompt == render(name, conv[:-1], tok, add_generation_prompt=True).text


@pytest.mark.parametrize("k", range(len(CONVS)))
def test_qwen3_non_thinking_against_qwen3_template(k, tok):
    """The generation prompt ends as Qwen3's with enable_thinking=False; the texts differ only where Qwen3's
    template leaves the empty block out of answers before the last user message (qwen3 writes it in every
    answer header, so each answer is trained after the header it is generated after)."""
    own, conv = with_template(tok, QWEN3), CONVS[k]
    earlier = sum(m["role"] == "assistant" for m in conv) - 1
    prompt = own.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    ours = render("qwen3", conv[:-1], tok, add_generation_prompt=True).text
    assert prompt == ours.replace(EMPTY, "", earlier) and ours.endswith(f"<|im_start|>assistant\n{EMPTY}")
    ours = render("qwen3", conv, tok).text
    assert own.apply_chat_template(conv, tokenize=False) == ours.replace(EMPTY, "", earlier) + "\n"


def test_qwen3_thinking_reasoning_as_qwen3_writes_it(tok):
    conv = [turn("user", "2+2?"), turn("assistant", "<think>\nadd them\n\n</think>\n4"), turn("user", "3+3?"),
            turn("assistant", "\n<think>add again</think>6")]
    r = render("qwen3-thinking", conv, tok)
    assert [r.text[s:e] for s, e in r.spans] == ["4<|im_end|>", "<think>\nadd again\n</think>\n\n6<|im_end|>"]
    assert with_template(tok, QWEN3).apply_chat_template(conv, tokenize=False) == r.text + "\n"
    kept = render("qwen3-thinking", conv, tok, keep_think=True)
    assert [kept.text[s:e] for s, e in kept.spans][0] == "<think>\nadd them\n\n</think>\n4<|im_end|>"


def ids_of(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


# MULTI in pieces: (text, trained). Encoding must give exactly these tokens, and labels = ids on trained pieces.
PIECES = {
    "gemma3": [("<bos><start_of_turn>user\nBe brief.\n\nGive three tips.<end_of_turn>\n<start_of_turn>model\n", 0),
               ("Sleep.\nWater.\nWalk.<end_of_turn>", 1), ("\n<start_of_turn>user\nOne more?<end_of_turn>\n"
                                                          "<start_of_turn>model\n", 0), ("Eat well.<end_of_turn>", 1)],
    "phi3": [("<|system|>\nBe brief.<|end|>\n<|user|>\nGive three tips.<|end|>\n<|assistant|>\n", 0),
             ("Sleep.\nWater.\nWalk.<|end|>", 1), ("\n<|user|>\nOne more?<|end|>\n<|assistant|>\n", 0),
             ("Eat well.<|end|>", 1)],
    "phi4": [("<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>Give three tips.<|im_end|>"
              "<|im_start|>assistant<|im_sep|>", 0), ("Sleep.\nWater.\nWalk.<|im_end|>", 1),
             ("<|im_start|>user<|im_sep|>One more?<|im_end|><|im_start|>assistant<|im_sep|>", 0),
             ("Eat well.<|im_end|>", 1)],
    "qwen3": [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGive three tips.<|im_end|>\n"
               f"<|im_start|>assistant\n{EMPTY}", 0), ("Sleep.\nWater.\nWalk.<|im_end|>", 1),
              (f"\n<|im_start|>user\nOne more?<|im_end|>\n<|im_start|>assistant\n{EMPTY}", 0),
              ("Eat well.<|im_end|>", 1)],
    "qwen3-thinking": [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nGive three tips.<|im_end|>\n"
                        "<|im_start|>assistant\n", 0), ("Sleep.\nWater.\nWalk.<|im_end|>", 1),
                       ("\n<|im_start|>user\nOne more?<|im_end|>\n<|im_start|>assistant\n", 0),
                       (f"{EMPTY}Eat well.<|im_end|>", 1)],
}


@pytest.mark.parametrize("name", list(PIECES))
def test_masks_on_exact_ids(name, tok):
    ids, labels = [], []
    for text, trained in PIECES[name]:
        piece = ids_of(tok, text)
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    enc = encode(render(name, MULTI, tok), tok, max_len=1024)
    assert enc.input_ids == ids and enc.labels == labels
    stop = tok.convert_tokens_to_ids(FAMILIES[name].stop)
    assert labels[-1] == stop and labels.count(stop) == 2  # each answer's end token is trained


def test_controls_and_stops(tok):
    for name in PIECES:
        assert check_tokens(name, tok) == ""
    assert stop_tokens("gemma3", tok) == ["<eos>", "<end_of_turn>"]
    assert stop_tokens("phi3", tok) == ["<eos>", "<|end|>"]
    assert stop_tokens("qwen3", tok) == ["<eos>", "<|im_end|>"]
