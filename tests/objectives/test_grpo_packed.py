"""GRPO's log-probability passes over packed rows (the run's packing on: each micro-batch's prompts + completions back
to back in one row, no padding computed) give the padded batch's values and LoRA gradients, and a GRPO run trains
to the same losses packed as padded."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model, write_jsonl
from slimtune import fit
from slimtune.config import Config, MethodConfig
from slimtune.data import pack
from slimtune.data.prompts import build_prompts
from slimtune.engine import completion_logps as cl
from slimtune.objectives import logps as logps_mod
from slimtune.engine import decode, grpo_sample, timing
from slimtune.kernels import attention, select
from slimtune.methods import apply
from slimtune.runs.metrics_log import read_metrics

PAD = 0


def _batch(device: str = "cpu") -> dict[str, torch.Tensor]:
    """4 rows: prompts of 6, 4, 2 and 5 tokens left-padded to 6, completions of 5, 2, 1 and 4 tokens (stopped
    early, pad after the stop) right-padded to 5."""
    g = torch.Generator().manual_seed(1)
    prompt_mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 1, 1]])
    completion_mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]])
    prompt_ids = torch.randint(5, 400, (4, 6), generator=g).masked_fill(prompt_mask == 0, PAD)
    completion_ids = torch.randint(5, 400, (4, 5), generator=g).masked_fill(completion_mask == 0, PAD)
    batch = {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
             "completion_mask": completion_mask}
    return {k: v.to(device) for k, v in batch.items()}


def _model(dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    model = apply(make_model(400, seed=2).to(device, dtype),
                  MethodConfig(name="lora", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter: lora_B starts at zero, which would hide it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    attention.enable(model)
    return model


def test_the_packed_row_holds_each_rows_real_tokens_and_where_each_completion_token_is_predicted():
    batch = _batch()
    inputs, predicts = cl.pack_rows(batch)
    # row lengths 6+5, 4+2, 2+1, 5+4: 29 tokens, no pad; positions restart at 0 in every row
    assert inputs[pack.BOUNDS] == (0, 11, 17, 20, 29) and inputs["input_ids"].shape == (1, 29)
    assert inputs["cu_seq_lens_q"].tolist() == [0, 11, 17, 20, 29] and inputs["max_length_q"] == 11
    assert inputs["position_ids"][0].tolist() == [*range(11), *range(6), *range(3), *range(9)]
    row1 = torch.cat([batch["prompt_ids"][1, 2:], batch["completion_ids"][1, :2]])
    assert torch.equal(inputs["input_ids"][0, 11:17], row1)
    # a completion token at packed position p is predicted at p - 1: row 0's at 6..10, row 1's at 15, 16, ...
    assert predicts.tolist() == [5, 6, 7, 8, 9, 14, 15, 18, 24, 25, 26, 27]


@pytest.mark.parametrize("chunked", [True, False])
def test_packed_logps_and_lora_gradients_equal_the_padded_ones(chunked, monkeypatch):
    model, batch, mask = _model(), _batch(), _batch()["completion_mask"]
    chunks = lambda *a, _f=logps_mod.token_logps: _f(*a, rows=5)  # noqa: E731 (12 tokens in 3 chunks)
    monkeypatch.setattr(logps_mod, "token_logps", chunks)
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(4))
    out = {}
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        logps = cl.completion_logps(model, batch, 0.7, chunked=chunked, packed=packed)
        (logps * mask * weights).sum().backward()
        out[packed] = (logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (padded, pad_grads), (packed, pack_grads) = out[False], out[True]
    assert packed.shape == padded.shape == (4, 5) and bool((packed[mask == 0] == 0).all())
    assert torch.allclose(packed * mask, padded * mask, atol=1e-5, rtol=0), (packed - padded).abs().max()
    assert pack_grads.keys() == pad_grads.keys() and len(pack_grads) == 8
    for name, grad in pack_grads.items():
        assert grad.abs().max() > 0 and torch.allclose(grad, pad_grads[name], atol=1e-5, rtol=1e-4), name


def test_the_reference_pass_packs_too():
    model, batch = _model(), _batch()
    mask = batch["completion_mask"]
    padded = grpo_sample.reference_logps(model, batch, 1.0)
    packed = grpo_sample.reference_logps(model, batch, 1.0, packed=True)
    with torch.no_grad(), model.disable_adapter():
        plain = cl.completion_logps(model, batch, 1.0, packed=True)
    assert torch.allclose(packed * mask, padded * mask, atol=1e-5, rtol=0) and torch.equal(packed, plain)


def test_grpo_packs_in_rows_where_the_preference_objectives_do():
    tc = Config().train
    tc.objective = "grpo"
    for mode, device, want in (("auto", "cuda", "rows"), ("auto", "cpu", "off"), ("rows", "cpu", "rows"),
                               ("on", "cpu", "rows"), ("off", "cuda", "off")):
        tc.packing = mode
        assert select.choose(tc, device).packing == want, (mode, device)


def _run(tmp_path: object, tokenizer: object, packing: str, monkeypatch: pytest.MonkeyPatch, mode: str = "eager",
         device: str = "cpu") -> tuple[dict, list[dict], list[str]]:
    cfg = Config()
    texts = ["hello there", "The capital of France is", "1 2", "the quick brown fox jumps over"]
    cfg.data.train = str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in texts]))
    cfg.data.max_len, cfg.method = 64, MethodConfig(name="lora", r=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    cfg.train.objective, cfg.train.max_steps, cfg.train.device = "grpo", 3, device
    cfg.train.precision = "fp32" if device == "cpu" else "bf16"
    cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.batch_size, cfg.train.lr = 2, 1, 2, 3e-2
    cfg.train.packing, cfg.grpo.decode = packing, mode
    cfg.grpo.num_generations, cfg.grpo.max_new_tokens, cfg.grpo.rewards = 4, 6, []
    cfg.grpo.beta, cfg.grpo.steps_per_generation = 0.05, 2  # the reference and the old log-probs passes too
    prompts = build_prompts(cfg.data, tokenizer, needs_answer=False, log=lambda m: None).train
    model = apply(make_model(len(tokenizer), seed=1).to(device), cfg.method)  # fit trains where the model is
    computed = []  # the tokens each step computed, as the step clock gets them
    monkeypatch.setattr(timing.StepClock, "stop", lambda self, step, tokens=0, pauses=None, _f=timing.StepClock.stop:
                        computed.append(tokens) or _f(self, step, tokens, pauses))
    said: list[str] = []
    result = fit(model.train(), prompts, cfg, out_dir=tmp_path / f"{packing}-{mode}", tokenizer=tokenizer,
                 rewards=[lambda p, c, a: [float(len(x)) for x in c]], pad_id=tokenizer.pad_token_id, log=said.append)
    rows = read_metrics(tmp_path / f"{packing}-{mode}" / "metrics.jsonl")
    return result, [dict(r, computed_tokens=n) for r, n in zip(rows, computed)], said


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_a_grpo_run_trains_to_the_same_losses_packed_as_padded(tmp_path, tokenizer, monkeypatch, mode):
    """compiled: the static-cache decoder samples (the traced graph run as it is, for the CPU) from the model whose
    attention packing switched over, as a CUDA run with packing and grpo.decode on auto does."""
    monkeypatch.setattr(decode, "BACKEND", "eager")
    padded_result, padded, _ = _run(tmp_path, tokenizer, "off", monkeypatch)
    packed_result, packed, said = _run(tmp_path, tokenizer, "rows", monkeypatch, mode)
    assert padded_result["packing"] == "off" and packed_result["packing"] == "rows"
    assert [r["step"] for r in packed] == [r["step"] for r in padded] == [1, 2, 3]
    for a, b in zip(padded, packed):
        assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"]  # the same samples
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["kl"] - b["kl"]) < 1e-5, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-5 * a["grad_norm"], (a, b)
        assert b["computed_tokens"] < a["computed_tokens"]  # real tokens only, no padding
    assert any(line.startswith("grpo.decode=compiled") for line in said) == (mode == "compiled")
    assert not any("failed on the decode step" in line for line in said)
    assert any(abs(r["loss"]) > 1e-4 for r in padded) and padded[1]["kl"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention runs on CUDA only; the CPU tests "
                    "above check the packed row through the per-record attention")
def test_packed_logps_equal_padded_on_cuda_varlen():
    model, batch = _model(torch.bfloat16, "cuda"), _batch("cuda")
    mask = batch["completion_mask"]
    with torch.no_grad():
        padded = cl.completion_logps(model, batch, 0.7) * mask
        packed = cl.completion_logps(model, batch, 0.7, packed=True) * mask
    assert attention._fast(torch.empty(1, 1, 1, 8, device="cuda", dtype=torch.bfloat16), 0.0, None)
    assert torch.allclose(packed, padded, atol=0.05 * padded.abs().max().item() + 0.05), (packed - padded).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention and the CUDA-graph decoder run on "
                    "CUDA only; the CPU tests above run the same fit through the per-record attention")
def test_a_grpo_run_on_cuda_packs_by_default_and_samples_and_steps_as_the_padded_one(tmp_path, tokenizer, monkeypatch):
    """packing and grpo.decode on auto (varlen attention, the compiled decoder with CUDA graphs) against
    train.packing=off: step 1 samples the same completions from the same weights; its loss and gradient norm agree
    to bf16's precision."""
    padded_result, padded, _ = _run(tmp_path, tokenizer, "off", monkeypatch, "auto", "cuda")
    packed_result, packed, said = _run(tmp_path, tokenizer, "auto", monkeypatch, "auto", "cuda")
    assert padded_result["packing"] == "off" and packed_result["packing"] == "rows"
    assert any(line.startswith("grpo.decode=auto: sampling with a static KV cache") for line in said), said
    assert not any("failed on the decode step" in line for line in said)
    a, b = padded[0], packed[0]
    assert a["reward"] == b["reward"] and a["completion_length"] == b["completion_length"]
    assert abs(a["loss"] - b["loss"]) < 1e-3 and abs(a["grad_norm"] - b["grad_norm"]) < 0.05 * a["grad_norm"] + 1e-4
    assert b["computed_tokens"] < a["computed_tokens"] and len(packed) == 3
