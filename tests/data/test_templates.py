"""Chat templates: golden strings per family, answer spans, `auto` against apply_chat_template, stop tokens."""
from __future__ import annotations

import pytest

from conftest import CHATML, make_tokenizer
from slimtune.data.templates import FAMILIES, TemplateError, render, stop_tokens

SYS = {"role": "system", "content": "SYS"}
Q = {"role": "user", "content": "Q"}
A = {"role": "assistant", "content": "A"}
Q2 = {"role": "user", "content": "Q2"}
A2 = {"role": "assistant", "content": "A2"}
CONVOS = {"single": [Q, A], "system": [SYS, Q, A], "multi": [SYS, Q, A, Q2, A2]}

# A template that writes no end token after the answer, only a newline.
NO_END = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
# Llama-2's own chat_template (meta-llama/Llama-2-7b-chat-hf): it writes ' ' + answer + ' ' + eos_token.
LLAMA2_HF = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")


def s_tokenizer(chat_template: str = CHATML):
    """A Llama-2 / BLOOM / ChatGLM3 style tokenizer: bos <s>, eos = pad = </s>."""
    tok = make_tokenizer(eos="</s>", pad="</s>", chat_template=chat_template)
    tok.bos_token = "<s>"
    return tok


@pytest.fixture(scope="module")
def s_tok():
    return s_tokenizer()


def answers(r) -> list[str]:
    return [r.text[s:e] for s, e in r.spans]


# (family, conversation, tokenizer, golden text, golden trained answers). Each answer is trained with its
# end token; llama2 and bloom also train the space after the header ("[/INST] ", "Assistant: "), which the
# tokenizer joins to the answer's first word ("ĠA") and which the generation prompt leaves out.
GOLDEN = [
    ("llama2", "single", "s", "<s>[INST] Q [/INST] A </s>", [" A </s>"]),
    ("llama2", "system", "s", "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nQ [/INST] A </s>", [" A </s>"]),
    ("llama2", "multi", "s", "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nQ [/INST] A </s><s>[INST] Q2 [/INST] A2 </s>",
     [" A </s>", " A2 </s>"]),
    ("llama3", "single", "chatml",
     "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>", ["A<|eot_id|>"]),
    ("llama3", "system", "chatml",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>", ["A<|eot_id|>"]),
    ("llama3", "multi", "chatml",
     "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"
     "<|start_header_id|>user<|end_header_id|>\n\nQ2<|eot_id|>"
     "<|start_header_id|>assistant<|end_header_id|>\n\nA2<|eot_id|>", ["A<|eot_id|>", "A2<|eot_id|>"]),
    ("chatglm3", "single", "s", "[gMASK]sop<|user|> \nQ<|assistant|> \nA</s>", ["A</s>"]),
    ("chatglm3", "system", "s", "[gMASK]sop<|system|> \nSYS<|user|> \nQ<|assistant|> \nA</s>", ["A</s>"]),
    ("chatglm3", "multi", "s",
     "[gMASK]sop<|system|> \nSYS<|user|> \nQ<|assistant|> \nA</s><|user|> \nQ2<|assistant|> \nA2</s>",
     ["A</s>", "A2</s>"]),
    ("bloom", "single", "s", "Human: Q\n\nAssistant: A</s>", [" A</s>"]),
    ("bloom", "system", "s", "SYS\n\nHuman: Q\n\nAssistant: A</s>", [" A</s>"]),
    ("bloom", "multi", "s", "SYS\n\nHuman: Q\n\nAssistant: A</s>\n\nHuman: Q2\n\nAssistant: A2</s>",
     [" A</s>", " A2</s>"]),
    ("chatml", "single", "chatml", "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>",
     ["A<|im_end|>"]),
    ("chatml", "system", "chatml",
     "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>",
     ["A<|im_end|>"]),
    ("chatml", "multi", "chatml",
     "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
     "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>", ["A<|im_end|>", "A2<|im_end|>"]),
    # auto with the fixture's ChatML chat_template renders exactly as the chatml family
    ("auto", "single", "chatml", "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>",
     ["A<|im_end|>"]),
    ("auto", "system", "chatml",
     "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>",
     ["A<|im_end|>"]),
    ("auto", "multi", "chatml",
     "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
     "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>", ["A<|im_end|>", "A2<|im_end|>"]),
]


@pytest.mark.parametrize("name,convo,tok_kind,text,trained", GOLDEN, ids=[f"{g[0]}-{g[1]}" for g in GOLDEN])
def test_golden_text_and_spans(name, convo, tok_kind, text, trained, tokenizer, s_tok):
    r = render(name, CONVOS[convo], s_tok if tok_kind == "s" else tokenizer)
    assert r.text == text
    assert answers(r) == trained


# The generation prompt for [SYS, Q]: it ends with the answer header, less the header's final space for
# llama2 and bloom (in training that space is part of the answer's first token: "]" + "ĠA", ":" + "ĠA").
PROMPTS = [
    ("llama2", "s", "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nQ [/INST]"),
    ("llama3", "chatml", "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
                         "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("chatglm3", "s", "[gMASK]sop<|system|> \nSYS<|user|> \nQ<|assistant|> \n"),
    ("bloom", "s", "SYS\n\nHuman: Q\n\nAssistant:"),
    ("chatml", "chatml", "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"),
    ("auto", "chatml", "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"),
]


@pytest.mark.parametrize("name,tok_kind,text", PROMPTS, ids=[p[0] for p in PROMPTS])
def test_generation_prompt(name, tok_kind, text, tokenizer, s_tok):
    r = render(name, [SYS, Q], s_tok if tok_kind == "s" else tokenizer, add_generation_prompt=True)
    assert r.text == text
    assert r.spans == []


@pytest.mark.parametrize("name", ["auto", *FAMILIES])
@pytest.mark.parametrize("convo", list(CONVOS))
def test_generation_prompt_is_prefix_of_training_text(name, convo, tokenizer, s_tok):
    """Generation sees exactly the text that training saw before the final answer."""
    tok = s_tok if name in ("llama2", "chatglm3", "bloom") else tokenizer
    msgs = CONVOS[convo]
    full = render(name, msgs, tok)
    prompt = render(name, msgs[:-1], tok, add_generation_prompt=True).text
    assert full.text.startswith(prompt)
    assert full.spans[-1] == (len(prompt), len(full.text))  # the final answer starts where the prompt ends


def test_multi_turn_generation_prompt_llama2(s_tok):
    r = render("llama2", [Q, A, Q2], s_tok, add_generation_prompt=True)
    assert r.text == "<s>[INST] Q [/INST] A </s><s>[INST] Q2 [/INST]"


# ---- auto -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("convo", list(CONVOS))
def test_auto_equals_chat_template_minus_trailing_newline(convo, tokenizer):
    msgs = CONVOS[convo]
    full = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert full.endswith("<|im_end|>\n")
    r = render("auto", msgs, tokenizer)
    assert r.text == full[:-1]  # the documented difference: the newline after the final <|im_end|> is dropped
    assert render("auto", msgs[:-1], tokenizer, add_generation_prompt=True).text == \
        tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)


def test_auto_template_without_end_token_gets_eos():
    tok = make_tokenizer(chat_template=NO_END)
    r = render("auto", CONVOS["multi"], tok)
    assert tok.apply_chat_template(CONVOS["multi"], tokenize=False) == \
        "system: SYS\nuser: Q\nassistant: A\nuser: Q2\nassistant: A2\n"
    assert r.text == "system: SYS\nuser: Q\nassistant: A<|im_end|>\nuser: Q2\nassistant: A2<|im_end|>"
    assert answers(r) == ["A<|im_end|>", "A2<|im_end|>"]
    assert render("auto", [Q], tok, add_generation_prompt=True).text == "user: Q\nassistant: "


def test_auto_llama2_template_keeps_its_own_eos():
    """Llama-2 writes " </s>" after the answer: that is the end token, not a reason to add another EOS."""
    tok = s_tokenizer(LLAMA2_HF)
    full = tok.apply_chat_template(CONVOS["multi"], tokenize=False)
    assert full == "<s>[INST] <<SYS>>\nSYS\n<</SYS>>\n\nQ [/INST] A </s><s>[INST] Q2 [/INST] A2 </s>"
    r = render("auto", CONVOS["multi"], tok)
    assert r.text == full
    assert answers(r) == [" A </s>", " A2 </s>"]
    assert r.text == render("llama2", CONVOS["multi"], tok).text
    assert stop_tokens("auto", tok) == ["</s>"]


def test_auto_end_token_other_than_eos(s_tok):
    """A Qwen base tokenizer: EOS is another token, the template ends answers with <|im_end|>."""
    tok = make_tokenizer(eos="<|endoftext|>", pad="<|endoftext|>")
    r = render("auto", CONVOS["multi"], tok)
    assert r.text == tok.apply_chat_template(CONVOS["multi"], tokenize=False)[:-1]
    assert answers(r) == ["A<|im_end|>", "A2<|im_end|>"]
    assert stop_tokens("auto", tok) == ["<|endoftext|>", "<|im_end|>"]
    assert stop_tokens("auto", s_tok) == ["</s>", "<|im_end|>"]


def test_auto_without_chat_template_names_the_alternatives():
    tok = make_tokenizer(chat_template=None)
    with pytest.raises(TemplateError) as err:
        render("auto", CONVOS["single"], tok)
    assert str(err.value) == ("template 'auto': this tokenizer has no chat_template; choose data.template "
                              "from llama2, llama3, chatglm3, bloom, chatml, gemma3, phi3, phi4, qwen3, qwen3-thinking "
                              "(templates whose control tokens it has: llama3, chatglm3, chatml)")
    assert stop_tokens("auto", tok) == ["<|im_end|>"]


def test_auto_template_that_changes_the_answer():
    tok = make_tokenizer(chat_template="{% for m in messages %}{{ m['content'] | upper }}<|im_end|>{% endfor %}")
    with pytest.raises(TemplateError, match="changes the assistant's text"):
        render("auto", [Q, {"role": "assistant", "content": "a"}], tok)


def test_auto_template_that_rewrites_earlier_turns():
    tok = make_tokenizer(chat_template="{{ messages | length }}{% for m in messages %}{{ m['content'] }}"
                                       "<|im_end|>{% endfor %}")
    with pytest.raises(TemplateError, match="renders earlier turns differently"):
        render("auto", CONVOS["single"], tok)


def test_unknown_template(tokenizer):
    with pytest.raises(TemplateError) as err:
        render("vicuna", CONVOS["single"], tokenizer)
    assert str(err.value) == ("unknown template 'vicuna'; choose one of auto, llama2, llama3, chatglm3, bloom, chatml, "
                              "gemma3, phi3, phi4, qwen3, qwen3-thinking")


# ---- stop tokens --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,default,s", [
    ("llama2", ["<|im_end|>"], ["</s>"]),
    ("llama3", ["<|im_end|>", "<|eot_id|>"], ["</s>", "<|eot_id|>"]),
    ("chatglm3", ["<|im_end|>"], ["</s>"]),
    ("bloom", ["<|im_end|>"], ["</s>"]),
    ("chatml", ["<|im_end|>"], ["</s>", "<|im_end|>"]),
    ("auto", ["<|im_end|>"], ["</s>", "<|im_end|>"]),
])
def test_stop_tokens(name, default, s, tokenizer, s_tok):
    assert stop_tokens(name, tokenizer) == default
    assert stop_tokens(name, s_tok) == s


def test_stop_tokens_llama3_tokenizer():
    assert stop_tokens("llama3", make_tokenizer(eos="<|eot_id|>", pad="<|eot_id|>")) == ["<|eot_id|>"]
