"""Templates on hard input: long chats render in linear time, template failures name the record (and skip
mode skips it), an unsafe chat_template is one clear error, and a family template needs its control tokens."""
from __future__ import annotations

import json
import shutil
import signal
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import CHATML, make_tokenizer, write_jsonl
from slimtune import cli
from slimtune.config import DataConfig
from slimtune.data import build, sandbox
from slimtune.data.readers import DataError
from slimtune.data.templates import RecordTemplateError, TemplateError, check_tokens, render

NO_END = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
# Llama-3's way: every message's text is trimmed, so an answer ending in "\n" is not found as written.
TRIMMING = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] | trim) + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# A header that differs on the first turn: the fast path must learn the new header, not fall back for all.
FIRST_DIFFERENT = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'U: ' + m['content'] + '\\n' }}{% else %}"
                   "{{ ('First A: ' if loop.index == 2 else 'A: ') + m['content'] + '<|im_end|>\\n' }}{% endif %}"
                   "{% endfor %}{% if add_generation_prompt %}{{ 'First A: ' if messages | length == 1 else 'A: ' }}"
                   "{% endif %}")


def _chat(pairs: int) -> list[dict]:
    msgs = []
    for i in range(pairs):
        msgs += [{"role": "user", "content": f"question {i}?"}, {"role": "assistant", "content": f"answer {i}."}]
    return msgs


def reference_auto(messages, tokenizer):
    """The old rendering (one generation-prompt render per answer: quadratic), the reference for spans."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    text, spans, pos = "", [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        start = full.find(m["content"], len(prefix))
        end = start + len(m["content"])
        tok = "<|im_end|>" if full.startswith("<|im_end|>", end) else ""
        text += full[pos:end]
        span_start = len(text) - (end - len(prefix))
        text += tok or tokenizer.eos_token
        spans.append((span_start, len(text)))
        pos = end + len(tok)
    return text, spans


def test_5000_turn_record_renders_in_linear_time(tokenizer):
    msgs = _chat(5000)  # 10,000 messages, the 60 KB record: 269 s before
    start = time.process_time()  # CPU time: the test box is shared, and the point is the work done
    r = render("auto", msgs, tokenizer)
    seconds = time.process_time() - start
    assert seconds < 2.0, seconds
    assert len(r.spans) == 5000
    assert [r.text[s:e] for s, e in r.spans[:2]] == ["answer 0.<|im_end|>", "answer 1.<|im_end|>"]
    assert r.text[r.spans[-1][0]:] == "answer 4999.<|im_end|>"


TEXT = st.text(st.sampled_from("ab \n<|>imuserstant"), min_size=1, max_size=6).filter(lambda s: s.strip())


@settings(max_examples=60, deadline=None)
@given(turns=st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=6),
       template=st.sampled_from([CHATML, NO_END, FIRST_DIFFERENT]))
def test_auto_spans_equal_the_per_turn_reference(turns, template):
    """User texts that look like headers ("assistant", "<|im_end|>" pieces) must not move an answer."""
    tok = make_tokenizer(chat_template=template)
    msgs = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    r = render("auto", msgs, tok)
    assert (r.text, r.spans) == reference_auto(msgs, tok)


def test_a_header_that_changes_is_learned_not_rendered_per_turn(monkeypatch):
    tok = make_tokenizer(chat_template=FIRST_DIFFERENT)
    calls = []
    real = type(tok).apply_chat_template
    monkeypatch.setattr(type(tok), "apply_chat_template", lambda self, m, **kw: calls.append(len(m)) or
                        real(self, m, **kw))
    msgs = _chat(50)
    r = render("auto", msgs, tok)
    # full, markers, and the prompts of the first two answers (the second's header differs): not one per answer
    assert calls == [100, 100, 1, 3]
    assert (r.text, r.spans) == reference_auto(msgs, tok)


def test_trimming_template_names_the_record_and_skip_skips_it(tmp_path):
    tok = make_tokenizer(chat_template=TRIMMING)
    rows = [{"instruction": "Q", "output": "A"}, {"instruction": "Q", "output": "ends with a newline\n"},
            {"instruction": "Q2", "output": "B"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(RecordTemplateError) as err:
        build(DataConfig(train=str(path), eval_size=0), tok, log=lambda *_: None)
    assert str(err.value).startswith(f"{path} line 2: template 'auto': the chat_template changes the assistant's "
                                     "text")
    lines: list[str] = []
    built = build(DataConfig(train=str(path), eval_size=0, on_bad_record="skip"), tok, log=lines.append)
    assert len(built.train) == 2
    (s,) = built.skipped
    assert (s["where"], s["file"], s["line"], s["record"]) == (f"{path} line 2", str(path), 2, rows[1])
    assert "changes the assistant's text" in s["reason"]
    assert any("skipped 1 records that cannot be encoded (data.on_bad_record=skip); first: " in line for line in lines)


def test_template_raise_exception_is_a_record_error(tmp_path):
    tok = make_tokenizer(chat_template="{% if messages | length > 2 %}{{ raise_exception('one turn only') }}"
                                       "{% endif %}" + CHATML)
    rows = [{"instruction": "Q", "output": "A"}, {"instruction": "Q", "output": "A", "history": [["a", "b"]]}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(RecordTemplateError, match=f"^{path} line 2: the chat_template refused this conversation: "
                                                  "one turn only$"):
        build(DataConfig(train=str(path), eval_size=0), tok, log=lambda *_: None)


def test_too_many_turns_is_a_bad_record(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"messages": _chat(3)}, {"messages": _chat(1)}])
    cfg = DataConfig(train=str(path), eval_size=0, max_turns=4)
    with pytest.raises(DataError) as err:
        build(cfg, tokenizer, log=lambda *_: None)
    assert str(err.value) == (f"{path} line 1: 6 user/assistant turns, more than data.max_turns=4; split the "
                              "conversation, or raise data.max_turns (0 = no cap)")
    cfg.on_bad_record = "skip"
    lines: list[str] = []
    built = build(cfg, tokenizer, log=lines.append)
    assert len(built.train) == 1 and built.skipped[0]["line"] == 1
    assert f"skipped 1 records that cannot be encoded (data.on_bad_record=skip); first: {path} line 1: 6 " \
           "user/assistant turns, more than data.max_turns=4; split the conversation, or raise data.max_turns " \
           "(0 = no cap)" in lines


@pytest.mark.parametrize("template, message", [
    ("{{ ''.__class__.__mro__ }}", "the chat_template tried an operation the sandbox forbids (access to attribute "
                                   "'__class__' of 'str' object is unsafe.)"),
    ("{% for %}", "the chat_template is not valid Jinja (template line 1: Expected an expression"),
], ids=["sandbox escape", "syntax error"])
def test_unsafe_or_broken_chat_template_names_the_file(tmp_path, template, message, capsys, tiny_model_dir):
    folder = tmp_path / "tok"
    make_tokenizer(chat_template=template).save_pretrained(folder)
    shutil.copy(tiny_model_dir / "config.json", folder)  # so that inspect takes it for a model folder
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    with pytest.raises(TemplateError) as err:
        render("auto", _chat(1), tok)
    assert not isinstance(err.value, RecordTemplateError)  # the template is at fault, not a record
    assert str(err.value).startswith(f"{folder / 'chat_template.jinja'}: {message}")
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Q", "output": "A"}])
    assert cli.main(["inspect", str(data), "--model", str(folder)]) == 2
    assert capsys.readouterr().err.startswith(f"slimtune inspect: error: {folder / 'chat_template.jinja'}: ")


def test_huge_range_in_a_chat_template_is_one_error():
    """jinja's sandbox refuses range(10**9) with an OverflowError, which came out as a traceback."""
    tok = make_tokenizer(chat_template="{% for i in range(10**9) %}x{% endfor %}")
    with pytest.raises(TemplateError) as err:
        render("auto", _chat(1), tok)
    assert not isinstance(err.value, RecordTemplateError)
    assert "the chat_template asks for more than the sandbox allows (OverflowError: Range too big. The sandbox " \
           "blocks ranges larger than MAX_RANGE (100000).); do not use this tokenizer's template" in str(err.value)


def test_chat_template_that_runs_for_hours_is_stopped(monkeypatch):
    """Each range stays within the sandbox's 100,000 items, but two nested are 10^10 steps (no call inside
    the loops for a hook to see): the render's time limit stops it, and leaves no timer behind."""
    monkeypatch.setattr(sandbox, "RENDER_SECONDS", 0.5)
    tok = make_tokenizer(chat_template="{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}"
                                       "{% endfor %}")
    start = time.monotonic()
    with pytest.raises(TemplateError, match=r": the chat_template ran past 0.5 s on one conversation of 2 messages; "
                                            r"do not use this tokenizer's template"):
        render("auto", _chat(1), tok)
    assert time.monotonic() - start < 5
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0 and signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert render("auto", _chat(1), make_tokenizer()).spans  # a plain template renders after it, as before


def test_endless_chat_template_is_stopped_in_a_worker_thread(monkeypatch):
    """The web app renders in worker threads, which no alarm signal reaches: there the template's own lines
    watch the clock, and the trace is gone afterwards."""
    import sys
    import threading

    monkeypatch.setattr(sandbox, "RENDER_SECONDS", 0.5)
    tok = make_tokenizer(chat_template="{% set r = range(100000) %}{% for i in r %}{% for j in r %}{% endfor %}"
                                       "{% endfor %}")
    got: dict = {}

    def work():
        start = time.monotonic()
        try:
            render("auto", _chat(1), tok)
        except TemplateError as err:
            got.update(error=str(err), seconds=time.monotonic() - start, trace=sys.gettrace())
        got["plain"] = render("auto", _chat(1), make_tokenizer()).spans

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert "the chat_template ran past 0.5 s on one conversation of 2 messages" in got["error"]
    assert got["seconds"] < 5 and got["trace"] is None and got["plain"]


def _smol_like():
    """A tokenizer with ChatML tokens only, as SmolLM2: ChatGLM3's [gMASK] etc. are text to it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["hello there, general kenobi"] * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|im_start|>")


def test_family_template_without_its_tokens_is_refused_unless_forced(tmp_path):
    tok = _smol_like()
    with pytest.raises(TemplateError) as err:
        check_tokens("chatglm3", tok)
    assert str(err.value) == ("data.template=chatglm3: this tokenizer has no single token for [gMASK], sop, "
                              "<|system|>, <|user|>, <|assistant|>, so the template would be trained as pieces of "
                              "text; templates whose control tokens it has: chatml; or set "
                              "data.force_template=true to apply chatglm3 anyway")
    assert check_tokens("chatglm3", tok, force=True).startswith("warning: data.template=chatglm3: ")
    assert check_tokens("chatml", tok) == "" and check_tokens("bloom", tok) == ""
    tok.chat_template = CHATML
    with pytest.raises(TemplateError, match="the tokenizer's own chat_template fits it: use data.template=auto"):
        check_tokens("llama3", tok)
    path = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "hello", "output": "there"}] * 2)
    with pytest.raises(TemplateError, match="data.template=chatglm3"):
        build(DataConfig(train=str(path), eval_size=0, template="chatglm3"), tok, log=lambda *_: None)
    lines: list[str] = []
    build(DataConfig(train=str(path), eval_size=0, template="chatglm3", force_template=True), tok, log=lines.append)
    assert any(line.startswith("warning: data.template=chatglm3") for line in lines)


def test_family_tokens_present_in_the_test_tokenizer(tokenizer):
    for name in ("llama2", "llama3", "chatglm3", "bloom", "chatml"):
        assert check_tokens(name, tokenizer) == ""


def test_skipped_record_cut_away_by_truncation_keeps_the_record(tmp_path, tokenizer):
    rows = [{"instruction": "Q", "output": "A"}, {"instruction": "long " * 100, "output": "x"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    built = build(DataConfig(train=str(path), eval_size=0, max_len=16, template="chatml"), tokenizer,
                  log=lambda *_: None)
    (s,) = built.skipped
    assert (s["file"], s["line"], s["record"]) == (str(path), 2, rows[1])
    assert json.loads(json.dumps(s))["record"] == rows[1]


def test_every_record_failing_the_template_is_one_clear_error(tmp_path):
    tok = make_tokenizer(chat_template=TRIMMING)
    path = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "Q", "output": "A\n"}] * 2)
    with pytest.raises(DataError) as err:
        build(DataConfig(train=str(path), eval_size=0, on_bad_record="skip"), tok, log=lambda *_: None)
    assert str(err.value).startswith(f"{path}: no training record could be encoded; the first: {path} line 1: "
                                     "template 'auto': the chat_template changes the assistant's text")
