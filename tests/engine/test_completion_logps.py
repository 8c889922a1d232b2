"""GRPO's completion log-probabilities through the chunked head equal the model's own logits' log-softmax, values
and gradients, at the sampling temperature; a chunk smaller than the rows makes the chunking real."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from slimtune import config, methods
from slimtune.engine import completion_logps as cl
from slimtune.objectives import logps as logps_mod


def _batch(rows: int = 4, prompt: int = 6, new: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    prompt_mask[0, :2] = 0  # left padding, as sampling gives it
    completion_mask = torch.ones(rows, new, dtype=torch.long)
    completion_mask[1, 3:] = 0  # a completion that stopped early
    return {"prompt_ids": torch.randint(5, 400, (rows, prompt), generator=g), "prompt_mask": prompt_mask,
            "completion_ids": torch.randint(5, 400, (rows, new), generator=g), "completion_mask": completion_mask}


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_equals_plain_values_and_gradients(temperature, monkeypatch):
    model = methods.apply(make_model(400, seed=2).float(), config.MethodConfig(name="lora", r=4, alpha=8,
                                                                               dropout=0.0, target_modules=["q_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    batch = _batch()
    out = {}
    chunks = lambda *a, _f=logps_mod.token_logps: _f(*a, rows=3)  # noqa: E731 (20 rows in 7 chunks)
    monkeypatch.setattr(logps_mod, "token_logps", chunks)
    for chunked in (False, True):
        model.zero_grad(set_to_none=True)
        logps = cl.completion_logps(model, batch, temperature, chunked=chunked)
        (logps * batch["completion_mask"]).sum().backward()
        out[chunked] = (logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert out[True][0].shape == (4, 5)
    assert torch.allclose(out[True][0], out[False][0], atol=1e-5, rtol=0)
    assert out[True][1].keys() == out[False][1].keys() and len(out[True][1]) == 4
    for name, grad in out[True][1].items():
        assert torch.allclose(grad, out[False][1][name], atol=1e-5, rtol=1e-4), name


def test_a_head_that_post_processes_logits_runs_the_model_forward(monkeypatch):
    model = make_model(400, seed=2).float()
    monkeypatch.setattr(cl, "split_head", lambda m: None)
    called = []
    monkeypatch.setattr(logps_mod, "token_logps", lambda *a, **k: called.append(1))
    logps = cl.completion_logps(model, _batch(), 1.0)
    assert logps.shape == (4, 5) and not called and bool((logps <= 0).all())
