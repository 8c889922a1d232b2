"""Generation on a tiny random Llama: batching with left padding, stop tokens, sampling settings, and the
repetition penalty that ignores padding."""
from __future__ import annotations

import pytest
import torch

from slimtune.data.templates import stop_ids
from slimtune.evaluate.generate import RepetitionPenalty, Sampling, answer_all

QUESTIONS = ["Say something about Paris.", "Hi", "Give three tips for staying healthy, please, today.",
             "the quick brown fox jumps over the lazy dog 1 2 3 4 5 6 7 8 9 0"]


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _convs():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.mark.parametrize("template", ["auto", "llama3"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_batched_equals_one_by_one(model, tokenizer, template, penalty):
    s = Sampling(max_new_tokens=12, repetition_penalty=penalty)
    batched = answer_all(model, tokenizer, template, _convs(), s, batch_size=4)
    single = [answer_all(model, tokenizer, template, [c], s, batch_size=1) for c in _convs()]
    assert batched.tokens == [g.tokens[0] for g in single]
    assert batched.texts == [g.texts[0] for g in single]
    assert batched.new_tokens == sum(len(t) for t in batched.tokens) > 0 and batched.tokens_per_s > 0


def test_repetition_penalty_changes_greedy_output(model, tokenizer):
    plain = answer_all(model, tokenizer, "llama3", _convs(), Sampling(max_new_tokens=16))
    penalized = answer_all(model, tokenizer, "llama3", _convs(), Sampling(max_new_tokens=16, repetition_penalty=1.5))
    assert plain.tokens != penalized.tokens
    # no token repeats less under the penalty, summed over the answers
    repeats = lambda g: sum(len(t) - len(set(t)) for t in g.tokens)  # noqa: E731
    assert repeats(penalized) <= repeats(plain)


def test_repetition_penalty_skips_padding():
    scores = torch.tensor([[2.0, -2.0, 1.0, 4.0], [2.0, -2.0, 1.0, 4.0]])
    ids = torch.tensor([[0, 1, 3], [0, 0, 1]])  # row 1 is left-padded with token 0
    mask = torch.tensor([[1, 1], [0, 0]])  # prompt mask: row 1's prompt is all padding; token 1 was generated
    out = RepetitionPenalty(2.0, mask)(ids, scores.clone())
    assert out[0].tolist() == [1.0, -4.0, 1.0, 2.0]  # tokens 0, 1, 3 seen: positive halved, negative doubled
    assert out[1].tolist() == [2.0, -4.0, 1.0, 4.0]  # only the generated token 1: padding token 0 is not


def test_sampling_seed_and_top_k_one(model, tokenizer):
    convs = _convs()[:2]
    sample = Sampling(max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, top_k=0, seed=3)
    a, b = answer_all(model, tokenizer, "auto", convs, sample), answer_all(model, tokenizer, "auto", convs, sample)
    assert a.tokens == b.tokens
    greedy = answer_all(model, tokenizer, "auto", convs, Sampling(max_new_tokens=10))
    top1 = Sampling(max_new_tokens=10, do_sample=True, top_k=1, seed=0)
    assert answer_all(model, tokenizer, "auto", convs, top1).tokens == greedy.tokens  # top-k 1 sampling is greedy
    hot = Sampling(max_new_tokens=10, do_sample=True, temperature=5.0, top_k=0, seed=1)
    assert answer_all(model, tokenizer, "auto", convs, hot).tokens != greedy.tokens


def test_stops_on_the_template_stop_token_not_only_eos(model, tokenizer):
    """llama3 stops on <|eot_id|> (the tokenizer's EOS here is <|im_end|>): force it as the 4th token."""
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert stop_ids("llama3", tokenizer) == [tokenizer.eos_token_id, eot]
    calls = []

    def force(module, inputs, output):
        calls.append(1)
        if len(calls) >= 4:  # prefill, then 3 free tokens, then the stop token
            output[..., eot] = 1e4
        return output

    handle = model.get_output_embeddings().register_forward_hook(force)
    try:
        g = answer_all(model, tokenizer, "llama3", _convs()[:1], Sampling(max_new_tokens=20), batch_size=1)
    finally:
        handle.remove()
    assert g.stopped == [True] and len(g.tokens[0]) == 4 and g.tokens[0][-1] == eot
    assert "<|eot_id|>" not in g.texts[0]
