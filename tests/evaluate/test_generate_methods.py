"""Every method generates with what it trained: the first generated step's logits, as evaluate/generate.py
runs generate (batched, left-padded), equal the adapted model's forward at the last prompt position.

prefix_tuning failed this before: transformers 5.24's generate dropped the prefix that peft handed it as
`past_key_values`, so answers were the base model's. The reference forward runs each prompt alone, as
training sees it (right-padded, positions from 0): a left-padded forward would shift the prompt's positions
against the prefix keys, which carry no rotary position of their own."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from slimtune import config as config_mod
from slimtune import methods
from slimtune.data.encode import prompt_ids
from slimtune.data.templates import render
from slimtune.evaluate.generate import Sampling, answer_all

METHODS = ["lora", "dora", "rslora", "pissa", "ia3", "prompt_tuning", "p_tuning", "prefix_tuning", "freeze",
           "bitfit", "full"]  # qlora needs CUDA (bitsandbytes)
QUESTIONS = ["Hi", "Say something about Paris today, please.", "the quick brown fox"]
TOL = 1e-4  # fp32 on the CPU: batched vs single-row matmuls differ by ~1e-6 here


def _adapted(name: str, tokenizer):
    cfg = config_mod.load(None, [f"method.name={name}", "method.num_virtual_tokens=5", "method.r=4",
                                 "method.dropout=0", "method.trainable_layers=1"])
    arch = "qwen2" if name == "bitfit" else "llama"  # bitfit needs biases: Qwen2 has them on q/k/v
    model = methods.apply(make_model(len(tokenizer), arch), cfg.method).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as if trained: every trainable weight moved well away from its init
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def _record_head(model, calls: list):
    """Hook the output head: generate's first call (prefill) gives step 1's logits, its second step 2's."""
    def keep(module, inputs, output):
        calls.append(output[:, -1].detach().clone())
    return model.get_output_embeddings().register_forward_hook(keep)


@torch.no_grad()
def _forward_last(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("name", METHODS)
def test_first_step_logits_equal_the_adapted_forward(name, tokenizer):
    model = _adapted(name, tokenizer)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [prompt_ids(render("auto", c, tokenizer, add_generation_prompt=True), tokenizer) for c in convs]
    calls: list[torch.Tensor] = []
    handle = _record_head(model, calls)
    try:
        out = answer_all(model, tokenizer, "auto", convs, Sampling(max_new_tokens=2), batch_size=len(convs))
    finally:
        handle.remove()
    assert len(calls) == 2 and all(len(t) == 2 or out.stopped[i] for i, t in enumerate(out.tokens))
    # answer_all sorts prompts by length within the batch; map its rows back to input order
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for row, i in enumerate(order):
        want = _forward_last(model, prompts[i])
        diff = (calls[0][row] - want).abs().max().item()
        assert diff < TOL, f"{name}: prompt {i} first step differs from the forward by {diff:.3g}"
        # and the step after: a prefix stays in the cache, learned tokens in the context
        second = _forward_last(model, prompts[i] + out.tokens[i][:1])
        assert (calls[1][row] - second).abs().max().item() < TOL, f"{name}: prompt {i} second step"


def test_prefix_changes_the_answer_logits(tokenizer):
    """The check above means something: the prefix moves the logits far more than the tolerance."""
    model = _adapted("prefix_tuning", tokenizer)
    ids = prompt_ids(render("auto", [{"role": "user", "content": "Hi"}], tokenizer, add_generation_prompt=True),
                     tokenizer)
    with model.disable_adapter():
        base = _forward_last(model, ids)
    assert (_forward_last(model, ids) - base).abs().max().item() > 100 * TOL
