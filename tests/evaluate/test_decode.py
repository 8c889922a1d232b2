"""Answers cut at max_new_tokens inside a character (a Chinese character spans several byte-level tokens) end
before it in generate's texts, predictions and the streamed text, never in U+FFFD; a U+FFFD the model wrote
whole stays."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import write_jsonl
from scripted import ZH, Scripted
from slimtune.evaluate import decode
from slimtune.evaluate.generate import Sampling, answer_all


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_the_fixture_tokenizer_splits_chinese_characters_across_tokens(tokenizer):
    ids = _ids(tokenizer, ZH)
    assert [tokenizer.decode(ids[:k]) for k in (1, 2, 3)] == ["中\ufffd", "中文\ufffd", ZH]  # what the bug showed


@pytest.mark.parametrize("text, keep, want", [
    (ZH, 1, "中"), (ZH, 2, "中文"), (ZH, 3, ZH),
    ("é", 1, ""), ("é", 2, "é"),
    ("a\ufffdb", 2, "a"), ("a\ufffdb", 3, "a"), ("a\ufffdb", 4, "a\ufffd"),  # a whole U+FFFD (EF BF BD) stays
], ids=["zh1", "zh2", "zh3", "e1", "e2", "fffd2", "fffd3", "fffd4"])
def test_whole_text_leaves_out_only_an_unfinished_last_character(tokenizer, text, keep, want):
    assert decode.whole_text(tokenizer, _ids(tokenizer, text)[:keep]) == want


def test_whole_text_with_byte_fallback_tokens():
    """SentencePiece's byte fallback (Llama 2, Mistral) writes one U+FFFD per byte of an unfinished character."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<0xE4>": 1, "<0xB8>": 2, "<0xAD>": 3, "a": 4, "\u2581b": 5, "<0xEF>": 6, "<0xBF>": 7,
             "<0xBD>": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert fast.decode([4, 1, 2]) == "a\ufffd\ufffd"
    assert decode.whole_text(fast, [4, 1, 2]) == "a"
    assert decode.whole_text(fast, [4, 1, 2, 3, 5]) == "a中 b"
    assert decode.whole_text(fast, [4, 6, 7, 8]) == "a\ufffd"  # whole


@pytest.mark.parametrize("byte_len", [1, 2, 3, 4])
def test_unfinished_counts_the_bytes_of_a_begun_character(byte_len):
    char = {1: "a", 2: "é", 3: "中", 4: "😀"}[byte_len].encode()
    assert [decode.unfinished(b"x" + char[:k]) for k in range(byte_len + 1)] == [0] + [*range(1, byte_len), 0]


def test_generate_cut_inside_a_character_ends_before_it(tokenizer):
    model = Scripted(_ids(tokenizer, ZH))
    convs = [[{"role": "user", "content": "说中文"}]]
    texts = [answer_all(model, tokenizer, "chatml", convs, Sampling(max_new_tokens=n), 1).texts[0] for n in (1, 2, 3)]
    assert texts == ["中", "中文", ZH]


def test_generate_command_writes_whole_characters(tokenizer, tmp_path, monkeypatch, capsys):
    """predictions as `slimtune generate` writes them, the model cut after 2 of the 3 tokens of 中文字符."""
    from slimtune import cli
    from slimtune.commands import generate as command

    cfg = SimpleNamespace(data=SimpleNamespace(template="chatml", system="", max_len=64))
    monkeypatch.setattr(command, "load_for_inference", lambda args: (Scripted(_ids(tokenizer, ZH)), tokenizer, cfg,
                                                                     "cpu"))
    monkeypatch.setattr(command, "check_output", lambda *a, **k: None)  # tmp_path is no run folder (outputs.py)
    data = write_jsonl(tmp_path / "q.jsonl", [{"instruction": "说中文"}])
    out = tmp_path / "predictions.jsonl"
    rc = cli.main(["generate", str(tmp_path), "--input", str(data), "--output", str(out), "--max-new-tokens", "2",
                   "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert [json.loads(x)["prediction"] for x in out.read_text(encoding="utf-8").splitlines()] == ["中文"]


def test_the_web_streamer_holds_back_an_unfinished_character(tokenizer):
    ids = _ids(tokenizer, ZH)
    streamer = decode.queue(tokenizer, timeout=5)
    answer_all(Scripted(ids), tokenizer, "chatml", [[{"role": "user", "content": "说中文"}]],
               Sampling(max_new_tokens=2), 1, streamer=streamer)
    pieces = list(streamer)
    assert "".join(pieces) == "中文" and all("\ufffd" not in p for p in pieces), pieces
