"""Mask guards: a deliberately broken template per guard is refused before the model loads, naming the template
and the first records; `slimtune inspect` prints the same findings."""
from __future__ import annotations

import shutil

import pytest
from official_templates import QWEN3

from conftest import family_tokenizer, lora_run_config, write_jsonl
from slimtune import cli
from slimtune import data as data_mod
from slimtune.config import DataConfig
from slimtune.data import DataError, build
from slimtune.data.families import FAMILIES, Family
from slimtune.data.templates import Rendered, render

ROWS = [{"messages": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]}
        for i in range(6)]
THINK = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
         {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n6"}]


@pytest.fixture
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", ROWS)


def cfg(path, **kw) -> DataConfig:
    return DataConfig(train=str(path), **{"eval_size": 0, "max_len": 256, **kw})


def broken(monkeypatch, spans) -> None:
    """A template whose answer spans are `spans(text)` instead of the answers."""
    def fake(name, messages, tokenizer, add_generation_prompt=False, keep_think=False):
        r = render(name, messages, tokenizer, add_generation_prompt)
        return Rendered(r.text, spans(r.text), r.content)
    monkeypatch.setattr(data_mod, "render", fake)


def test_empty_trained_part_is_refused(train_file, tokenizer, monkeypatch):
    broken(monkeypatch, lambda text: [])
    with pytest.raises(DataError) as err:
        build(cfg(train_file), tokenizer, log=lambda *_: None)
    assert str(err.value) == (
        f"data.template=auto: 6 records with no trained token (the template's answer spans are empty) ({train_file} "
        f"line 1, {train_file} line 2, {train_file} line 3 and 3 more); check the answers are not empty and that "
        "data.template marks them (slimtune inspect shows the spans)")


def test_everything_trained_is_refused_unless_train_on_prompt(train_file, tokenizer, monkeypatch):
    broken(monkeypatch, lambda text: [(0, len(text))])
    with pytest.raises(DataError) as err:
        build(cfg(train_file), tokenizer, log=lambda *_: None)
    assert str(err.value).startswith(f"data.template=auto: 6 records with every token trained although the record "
                                     f"has a prompt ({train_file} line 1, ")
    assert "set data.train_on_prompt=true if training on prompts is meant" in str(err.value)
    assert len(build(cfg(train_file, train_on_prompt=True), tokenizer, log=lambda *_: None).train) == 6


def test_masked_end_token_is_refused(train_file, tokenizer, monkeypatch):
    """A family whose end-of-turn token sits outside the answer span (after_answer instead of answer_end)."""
    chatml = FAMILIES["chatml"]
    monkeypatch.setitem(FAMILIES, "noend", Family(
        name="noend", prefix="", system=chatml.system, user_first=chatml.user_first, user_next=chatml.user_next,
        answer_end="", after_answer="<|im_end|>\n", stop="<|im_end|>", controls=chatml.controls))
    with pytest.raises(DataError) as err:
        build(cfg(train_file, template="noend"), tokenizer, log=lambda *_: None)
    assert str(err.value).startswith(
        "data.template=noend: 6 records with an answer whose end-of-turn token is not trained (the model would not "
        f"learn to stop) ({train_file} line 1, ")
    enc = build(cfg(train_file, template="chatml"), tokenizer, log=lambda *_: None).train[0]
    assert enc.labels[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the intact family passes


def test_a_cut_answer_is_not_an_eos_finding(train_file, tokenizer):
    """Truncation that cuts the last answer's end token is counted by the stats, not refused."""
    full = len(build(cfg(train_file), tokenizer, log=lambda *_: None).train[0].input_ids)
    built = build(cfg(train_file, max_len=full - 1), tokenizer, log=lambda *_: None)
    assert built.train_stats.lost_eos > 0 and not built.train_stats.guards.records


@pytest.mark.parametrize("template", ["qwen3-thinking", "auto"])
def test_dropped_reasoning_is_refused_then_chosen(tmp_path, template):
    tok = family_tokenizer(QWEN3)
    path = write_jsonl(tmp_path / "think.jsonl", [{"messages": THINK}] * 4)
    with pytest.raises(DataError) as err:
        build(cfg(path, template=template), tok, log=lambda *_: None)
    assert str(err.value) == (
        f"data.template={template}: 4 records with <think> reasoning in answers before the last user message, which "
        "the template drops (as Qwen3's chat template does): only the reasoning after the last user message would "
        f"be trained ({path} line 1, {path} line 2, {path} line 3 and 1 more); set data.think_history=drop to train "
        "that way, or data.think_history=keep (with data.template=qwen3-thinking) to keep and train every answer's "
        "reasoning as written")
    dropped = build(cfg(path, template=template, think_history="drop"), tok, log=lambda *_: None).train[0]
    assert "add" not in tok.decode(dropped.input_ids[:dropped.input_ids.index(tok.convert_tokens_to_ids("4"))])
    if template == "auto":
        with pytest.raises(DataError, match="use data.template=qwen3-thinking to keep it"):
            build(cfg(path, template=template, think_history="keep"), tok, log=lambda *_: None)
        return
    kept = build(cfg(path, template=template, think_history="keep"), tok, log=lambda *_: None).train[0]
    runs = tok.decode([x for x in kept.labels if x != -100])
    assert runs == "<think>\nadd\n</think>\n\n4<|im_end|><think>\nadd\n</think>\n\n6<|im_end|>"


def test_train_refuses_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from slimtune import models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(models, "load", no_load)
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    config = lora_run_config(tmp_path, tiny_model_dir, "run", data={"template": "noend"})
    chatml = FAMILIES["chatml"]
    monkeypatch.setitem(FAMILIES, "noend", Family(
        name="noend", prefix="", system=chatml.system, user_first=chatml.user_first, user_next=chatml.user_next,
        answer_end="", after_answer="<|im_end|>\n", stop="<|im_end|>", controls=chatml.controls))
    monkeypatch.setitem(__import__("slimtune.config.checks", fromlist=["CHOICES"]).CHOICES, "data.template",
                        ("auto", "noend"))
    assert cli.main(["train", str(config)]) != 0
    out = capsys.readouterr()
    assert out.err.startswith("slimtune train: error: data.template=noend: 6 records with an answer whose "
                              "end-of-turn token is not trained (the model would not learn to stop) (")


def test_inspect_shows_the_guards(tmp_path, tiny_model_dir, capsys):
    tok = family_tokenizer(QWEN3)
    tok.save_pretrained(tmp_path / "tok")
    shutil.copy(tiny_model_dir / "config.json", tmp_path / "tok")  # inspect reads the tokenizer only
    path = write_jsonl(tmp_path / "think.jsonl", [{"messages": THINK}])
    assert cli.main(["inspect", str(path), "--model", str(tmp_path / "tok"), "--template", "qwen3-thinking"]) == 0
    out = capsys.readouterr().out
    assert "GUARD: data.template=qwen3-thinking: 1 record with <think> reasoning in answers before the last user " \
           "message" in out and f"({path} line 1)" in out
    assert cli.main(["inspect", str(path), "--model", str(tmp_path / "tok"), "--template", "qwen3-thinking",
                     "--think-history", "keep"]) == 0
    assert "guards: every record trains its answers and their end tokens" in capsys.readouterr().out
