"""Encoding: input_ids are the template's own tokens; labels are -100 on the prompt and train every answer + EOS."""
from __future__ import annotations

import pytest
import torch

from conftest import CHATML, family_tokenizer, make_tokenizer, write_jsonl
from slimtune.config import DataConfig
from slimtune.data import DataError, build
from slimtune.data.collate import collate, pad_id
from slimtune.data.encode import IGNORE, Stats, encode, prompt_ids
from slimtune.data.templates import FAMILIES, render

SYSTEM = {"role": "system", "content": "Who are you? I am a small model."}
USER = {"role": "user", "content": "Give three tips for staying healthy."}
ANSWER = {"role": "assistant", "content": "The capital of France is Paris."}
USER2 = {"role": "user", "content": "Hello there! How are you today?"}
ANSWER2 = {"role": "assistant", "content": "the quick brown fox jumps over the lazy dog"}
SINGLE = [SYSTEM, USER, ANSWER]
MULTI = [SYSTEM, USER, ANSWER, USER2, ANSWER2]
CHINESE = [{"role": "system", "content": "你好，世界。"},
           {"role": "user", "content": "中文字符，你好？"}, {"role": "assistant", "content": "你好，世界。中文字符"},
           {"role": "user", "content": "世界"}, {"role": "assistant", "content": "中文，字符。"}]
NO_END = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
# qwen3-thinking writes an answer differently once a later user turn follows (its reasoning block is dropped),
# so the prefix construction of expected_labels does not apply: tests/data/test_families.py checks it exactly.
ALL = ["auto", *(name for name, fam in FAMILIES.items() if not fam.think)]
NEW = ("gemma3", "phi3", "phi4", "qwen3")


@pytest.fixture(scope="module")
def s_tok():
    """bos <s>, eos = pad = </s>, as Llama-2, BLOOM and ChatGLM3 tokenizers."""
    tok = make_tokenizer(eos="</s>", pad="</s>", chat_template=CHATML)
    tok.bos_token = "<s>"
    return tok


@pytest.fixture(scope="module")
def f_tok():
    return family_tokenizer()


def tok_for(name, tokenizer, s_tok, f_tok=None):
    if name in NEW:
        return f_tok or family_tokenizer()
    return s_tok if name in ("llama2", "chatglm3", "bloom") else tokenizer


def tokens(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def expected_labels(name: str, msgs: list[dict], tok, ids: list[int]) -> list[int]:
    """Labels computed without spans or offsets: each answer's tokens lie between the tokens of its
    generation prompt and those of the conversation up to its end token; both must be prefixes of ids."""
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = tokens(tok, render(name, msgs[:i], tok, add_generation_prompt=True).text)
        through = tokens(tok, render(name, msgs[: i + 1], tok).text)
        assert ids[: len(before)] == before
        assert ids[: len(through)] == through
        labels[len(before): len(through)] = ids[len(before): len(through)]
    return labels


def trained_runs(tok, labels: list[int]) -> list[str]:
    """The decoded text of each contiguous run of trained labels."""
    runs, cur = [], []
    for x in labels + [IGNORE]:
        if x != IGNORE:
            cur.append(x)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs


def end_id(name: str, tok) -> int:
    if name in FAMILIES:
        return tok.convert_tokens_to_ids(FAMILIES[name].stop.format(eos=tok.eos_token, bos=tok.bos_token))
    return tok.eos_token_id


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("msgs", [SINGLE, MULTI, CHINESE], ids=["single", "multi", "chinese"])
def test_ids_and_exact_masks(name, msgs, tokenizer, s_tok, f_tok):
    tok = tok_for(name, tokenizer, s_tok, f_tok)
    rendered = render(name, msgs, tok)
    enc = encode(rendered, tok, max_len=1024, where="rec 1")
    assert enc.input_ids == tokens(tok, rendered.text)
    assert enc.labels == expected_labels(name, msgs, tok, enc.input_ids)
    assert enc.labels[-1] == enc.input_ids[-1] == end_id(name, tok)
    assert (enc.where, enc.truncated, enc.lost_eos, enc.lost_answer) == ("rec 1", False, False, False)


# What each family trains, decoded: every answer with its end token. llama2 and bloom also train the
# space before the answer, which the tokenizer joins to its first word ("ĠThe").
TRAINED = {
    "llama2": [" The capital of France is Paris. </s>", " the quick brown fox jumps over the lazy dog </s>"],
    "llama3": ["The capital of France is Paris.<|eot_id|>", "the quick brown fox jumps over the lazy dog<|eot_id|>"],
    "chatglm3": ["The capital of France is Paris.</s>", "the quick brown fox jumps over the lazy dog</s>"],
    "bloom": [" The capital of France is Paris.</s>", " the quick brown fox jumps over the lazy dog</s>"],
    "chatml": ["The capital of France is Paris.<|im_end|>", "the quick brown fox jumps over the lazy dog<|im_end|>"],
    "auto": ["The capital of France is Paris.<|im_end|>", "the quick brown fox jumps over the lazy dog<|im_end|>"],
    "gemma3": ["The capital of France is Paris.<end_of_turn>",
               "the quick brown fox jumps over the lazy dog<end_of_turn>"],
    "phi3": ["The capital of France is Paris.<|end|>", "the quick brown fox jumps over the lazy dog<|end|>"],
    "phi4": ["The capital of France is Paris.<|im_end|>", "the quick brown fox jumps over the lazy dog<|im_end|>"],
    "qwen3": ["The capital of France is Paris.<|im_end|>", "the quick brown fox jumps over the lazy dog<|im_end|>"],
}


@pytest.mark.parametrize("name", ALL)
def test_multi_turn_trains_every_answer_and_its_end(name, tokenizer, s_tok, f_tok):
    tok = tok_for(name, tokenizer, s_tok, f_tok)
    enc = encode(render(name, MULTI, tok), tok, max_len=1024)
    assert trained_runs(tok, enc.labels) == TRAINED[name]
    ends = [i for i, x in enumerate(enc.labels) if x != IGNORE and (i + 1 == len(enc.labels)
                                                                    or enc.labels[i + 1] == IGNORE)]
    assert [enc.labels[i] for i in ends] == [end_id(name, tok)] * 2
    # everything else (system, user turns, headers) is masked
    trained = sum(len(tokens(tok, t)) for t in TRAINED[name])
    assert enc.labels.count(IGNORE) == len(enc.input_ids) - trained


@pytest.mark.parametrize("name", ALL)
def test_chinese_answers(name, tokenizer, s_tok, f_tok):
    tok = tok_for(name, tokenizer, s_tok, f_tok)
    enc = encode(render(name, CHINESE, tok), tok, max_len=1024)
    end = {"llama3": "<|eot_id|>", "chatml": "<|im_end|>", "auto": "<|im_end|>", "gemma3": "<end_of_turn>",
           "phi3": "<|end|>", "phi4": "<|im_end|>", "qwen3": "<|im_end|>"}.get(name, "</s>")
    lead = " " if name in ("llama2", "bloom") else ""
    tail = " " if name == "llama2" else ""
    assert trained_runs(tok, enc.labels) == [f"{lead}你好，世界。中文字符{tail}{end}",
                                             f"{lead}中文，字符。{tail}{end}"]


def test_auto_ids_equal_apply_chat_template(tokenizer):
    for msgs in (SINGLE, MULTI, CHINESE):
        out = tokenizer.apply_chat_template(msgs, tokenize=True)
        ids = out if isinstance(out, list) else list(out["input_ids"])
        assert ids[-1] == tokens(tokenizer, "\n")[0]
        assert encode(render("auto", msgs, tokenizer), tokenizer, max_len=1024).input_ids == ids[:-1]


def test_auto_template_without_end_token_trains_the_added_eos():
    tok = make_tokenizer(chat_template=NO_END)
    rendered = render("auto", MULTI, tok)
    enc = encode(rendered, tok, max_len=1024)
    assert enc.input_ids == tokens(tok, rendered.text)
    # the generation prompt "assistant: " keeps its space; "Ġthe" straddles it and is trained, "Ġ" + "The" not
    assert trained_runs(tok, enc.labels) == ["The capital of France is Paris.<|im_end|>",
                                             " the quick brown fox jumps over the lazy dog<|im_end|>"]
    assert enc.labels[-1] == tok.eos_token_id


def test_generation_prompt_tokens_are_a_prefix_of_training_tokens(tokenizer, s_tok, f_tok):
    for name in [*ALL, "qwen3-thinking"]:
        tok = tok_for(name, tokenizer, s_tok, f_tok)
        ids = encode(render(name, MULTI, tok), tok, max_len=1024).input_ids
        prompt = prompt_ids(render(name, MULTI[:-1], tok, add_generation_prompt=True), tok)
        assert ids[: len(prompt)] == prompt, name
        assert ids[len(prompt)] != tokens(tok, " ")[0], name  # no bare-space token ends the prompt


def test_train_on_prompt_has_no_ignored_label(tokenizer):
    enc = encode(render("chatml", MULTI, tokenizer), tokenizer, max_len=1024, train_on_prompt=True)
    assert enc.labels == enc.input_ids
    assert IGNORE not in enc.labels


def test_pad_equal_to_eos_keeps_eos_label_and_masks_padding(tokenizer):
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    short = encode(render("chatml", [USER, {"role": "assistant", "content": "Paris."}], tokenizer), tokenizer, 1024)
    long = encode(render("chatml", SINGLE, tokenizer), tokenizer, 1024)
    assert short.labels[-1] == eos
    # the <|im_end|> that closes the user turn has the same id as the EOS, but is prompt: not trained
    first_end = short.input_ids.index(eos)
    assert first_end < len(short.input_ids) - 1 and short.labels[first_end] == IGNORE

    batch = collate([short, long], pad_id(tokenizer))
    n, width = len(short.input_ids), len(long.input_ids)
    assert width > n
    pad = width - n
    assert batch["input_ids"].tolist() == [short.input_ids + [eos] * pad, long.input_ids]
    assert batch["labels"].tolist() == [short.labels + [IGNORE] * pad, long.labels]
    assert batch["attention_mask"].tolist() == [[1] * n + [0] * pad, [1] * width]
    assert batch["labels"][0, n - 1].item() == eos  # the real EOS keeps its label, the pads do not


# ---- truncation ---------------------------------------------------------------------------------------

FITS = [USER, {"role": "assistant", "content": "Paris."}]
LOSES_EOS = [USER, {"role": "assistant", "content": "The capital of France is Paris."}]
LOSES_ANSWER = [{"role": "user", "content": "the quick brown fox jumps over the lazy dog " * 3},
                {"role": "assistant", "content": "Paris."}]


def _three(tokenizer):
    """Full (untruncated) ids and labels of the three records, and a max_len that cuts only the EOS of
    the second."""
    full = [encode(render("chatml", m, tokenizer), tokenizer, 10_000) for m in (FITS, LOSES_EOS, LOSES_ANSWER)]
    max_len = len(full[1].input_ids) - 1
    prompt3 = prompt_ids(render("chatml", LOSES_ANSWER[:1], tokenizer, add_generation_prompt=True), tokenizer)
    assert len(full[0].input_ids) <= max_len <= len(prompt3)  # the three cases really are the three cases
    return full, max_len


def test_truncation_flags_and_stats(tokenizer):
    full, max_len = _three(tokenizer)
    encs = [encode(render("chatml", m, tokenizer), tokenizer, max_len, where=f"r{i}")
            for i, m in enumerate((FITS, LOSES_EOS, LOSES_ANSWER))]
    assert [(e.truncated, e.lost_eos, e.lost_answer) for e in encs] == [
        (False, False, False), (True, True, False), (True, True, True)]
    for e, f in zip(encs, full):
        assert e.input_ids == f.input_ids[:max_len]
        assert e.labels == f.labels[:max_len]
    assert encs[1].labels[-1] != tokenizer.eos_token_id and full[1].labels[-1] == tokenizer.eos_token_id
    assert set(encs[2].labels) == {IGNORE}

    stats = Stats()
    for e in encs:
        stats.add(e)
    trained = [sum(x != IGNORE for x in f.labels) for f in full]
    assert (stats.records, stats.truncated, stats.lost_eos, stats.lost_answer) == (3, 2, 2, 1)
    assert stats.lengths == [len(full[0].input_ids), max_len, max_len]
    assert stats.tokens == len(full[0].input_ids) + 2 * max_len
    assert stats.trained_tokens == trained[0] + trained[1] - 1
    assert stats.summary("train", max_len) == (
        f"train: 3 records, {stats.tokens} tokens ({stats.trained_tokens} trained); 2 truncated at "
        f"max_len={max_len}, of which 2 lost their EOS and 1 lost their whole answer")


def test_truncation_inside_a_later_turn_keeps_earlier_answers(tokenizer):
    full = encode(render("chatml", MULTI, tokenizer), tokenizer, 10_000)
    first_end = full.labels.index(tokenizer.eos_token_id)  # the first answer's <|im_end|>
    enc = encode(render("chatml", MULTI, tokenizer), tokenizer, first_end + 3)
    assert (enc.truncated, enc.lost_eos, enc.lost_answer) == (True, True, False)
    assert trained_runs(tokenizer, enc.labels) == ["The capital of France is Paris.<|im_end|>"]


def test_build_reports_truncation_and_drops(tokenizer, tmp_path):
    full, max_len = _three(tokenizer)
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": m} for m in (FITS, LOSES_EOS, LOSES_ANSWER)])
    logs: list[str] = []
    built = build(DataConfig(train=str(path), eval_size=0, template="chatml", max_len=max_len), tokenizer,
                  log=logs.append)
    tokens_ = len(full[0].input_ids) + 2 * max_len
    trained = sum(x != IGNORE for x in full[0].labels) + sum(x != IGNORE for x in full[1].labels) - 1
    assert logs == [
        f"read 3 records from {path}; held out 0 for eval",
        f"train: 3 records, {tokens_} tokens ({trained} trained); 2 truncated at max_len={max_len}, "
        f"of which 2 lost their EOS and 1 lost their whole answer",
        f"train: 1 records have no trained token left after truncation and are not used (first: {path} line 3)",
    ]
    assert [e.where for e in built.train] == [f"{path} line 1", f"{path} line 2"]
    assert [e.input_ids for e in built.train] == [full[0].input_ids, full[1].input_ids[:max_len]]
    assert built.eval == []
    stats = built.train_stats
    assert (stats.records, stats.truncated, stats.lost_eos, stats.lost_answer) == (3, 2, 2, 1)


def test_build_with_no_answer_left_is_an_error(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": LOSES_ANSWER}] * 2)
    logs: list[str] = []
    with pytest.raises(DataError) as err:
        build(DataConfig(train=str(path), eval_size=0, template="chatml", max_len=4), tokenizer, log=logs.append)
    assert str(err.value) == (f"{path}: no training record has an answer token left within data.max_len=4; "
                              "raise data.max_len")
    assert logs[-1] == (f"train: 2 records have no trained token left after truncation and are not used "
                        f"(first: {path} line 1)")


def test_encoded_tensors_dtype(tokenizer):
    batch = collate([encode(render("chatml", SINGLE, tokenizer), tokenizer, 1024)], pad_id(tokenizer))
    assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys(batch, torch.long)
