"""Numeric guards: a NaN/inf loss or gradient stops the run (or skips the step) with a message naming the step,
the batch's records and the likely cause; fp16 loss-scaling overflow stays the GradScaler's business."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import lora_run_config
from slimtune import cli, config, methods
from slimtune.data import encode_examples
from slimtune.data.collate import collate, pad_id
from slimtune.data.readers import DataError, from_alpaca
from slimtune.engine import checkpoint, guards, precision
from slimtune.engine.log import read_metrics
from slimtune.engine.loop import fit, forward_context, step
from slimtune.engine.optim import build_optimizer, build_scheduler

NAN = float("nan")


def _config(tmp: Path, model_dir: Path, **train) -> Path:
    return lora_run_config(tmp, model_dir, "run", copies=2, data={"eval_size": 0}, method={"dropout": 0.0},
                           **{"max_steps": 6, "micro_batch_size": 4, "warmup_steps": 0, "save_every": 1, **train})


@pytest.fixture
def nan_at_step_3(monkeypatch):
    """The loss of step 3's batch turns NaN (one micro-batch per step; eval has its own loss function)."""
    import slimtune.engine.loop as loop

    real, calls = loop.token_loss_sum, []

    def poisoned(model, batch, chunked=False):
        calls.append(1)
        s, n = real(model, batch, chunked)
        return (s * NAN if len(calls) == 3 else s), n

    monkeypatch.setattr(loop, "token_loss_sum", poisoned)


def test_nan_loss_stops_the_run_naming_step_records_and_cause(tmp_path, tiny_model_dir, nan_at_step_3, capsys):
    assert cli.main(["train", str(_config(tmp_path, tiny_model_dir)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    data = tmp_path / "train.jsonl"
    assert "slimtune train: error: step 3: the loss is nan (not finite); batch records: " in err
    assert len(re.findall(rf"{re.escape(str(data))} line \d+", err)) == 4  # micro_batch_size records
    assert "Likely cause: the forward pass made a NaN/inf from finite weights" in err
    assert "step-000002 (slimtune train CONFIG --resume goes on from it" in err
    run = tmp_path / "run"
    assert checkpoint.latest(run).name == "step-000002"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert not (run / "adapter_model.safetensors").exists()


def test_nan_loss_with_on_nan_skip_skips_that_update(tmp_path, tiny_model_dir, nan_at_step_3, capsys):
    cfg = _config(tmp_path, tiny_model_dir, on_nan="skip")
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "warning: step 3: the loss is nan" in out and "Skipped this update (train.on_nan=skip)" in out
    assert "train.on_nan=skip: 1 of 6 steps skipped" in out
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r.get("nan_skipped", False) for r in rows] == [False, False, True, False, False, False]
    weights = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())
    final = load_file(tmp_path / "run" / checkpoint.ROOT / "step-000006" / checkpoint.RAW)
    assert all(bool(torch.isfinite(w).all()) for w in final.values())


def _tiny(tiny_model_dir, tokenizer, plan=precision.plan("fp32", "cpu")):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=plan.weights)
    model = methods.apply(model, config.MethodConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    precision.cast_trainable(model, plan.trainable)
    exs = [from_alpaca({"instruction": f"Say {w}.", "output": f"{w} it is."}, f"data.jsonl line {i + 1}")
           for i, w in enumerate(("Paris", "blue", "seven"))]
    records = encode_examples(exs, tokenizer, config.DataConfig(max_len=64))[0]
    return model, records


def test_a_nan_weight_is_named_as_the_cause(tiny_model_dir, tokenizer, tmp_path):
    model, records = _tiny(tiny_model_dir, tokenizer)
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        p[0, 0] = NAN
    cfg = config.Config(train=config.TrainConfig(max_steps=2, micro_batch_size=3, save_every=0))
    with pytest.raises(guards.NumericError) as err:
        fit(model, records, [], cfg, pad_id(tokenizer), tmp_path, "cpu", log=lambda *_: None, show_progress=False)
    msg = str(err.value)
    assert msg.startswith("step 1: the loss is nan")
    assert "data.jsonl line 1" in msg and "data.jsonl line 3" in msg
    assert f"Likely cause: the weight {name} already holds NaN/inf" in msg
    assert "no checkpoint was written yet" in msg


def test_a_nan_gradient_with_a_finite_loss_is_caught(tiny_model_dir, tokenizer):
    model, records = _tiny(tiny_model_dir, tokenizer)
    p = next(p for n, p in model.named_parameters() if "lora_B" in n)
    p.register_hook(lambda g: g * NAN)
    tc = config.TrainConfig(lr=1e-2)
    opt = build_optimizer(model, tc)
    before = {n: q.detach().clone() for n, q in model.named_parameters() if q.requires_grad}
    row = step(model, [collate(records, pad_id(tokenizer))], opt, build_scheduler(opt, 2, tc), 1.0, guard=True)
    assert row["nonfinite"] == "gradient" and row["loss"] == row["loss"]  # the loss itself is finite
    assert all(torch.equal(q, before[n]) for n, q in model.named_parameters() if q.requires_grad)
    cause = guards.likely_cause("gradient", model, "fp32", 1e-2, [])
    assert cause.startswith("the gradient overflowed while the loss stayed finite: lower train.lr (now 0.01)")
    # unguarded, step() keeps its old contract: the update is applied and nothing is flagged
    row = step(model, [collate(records, pad_id(tokenizer))], opt, build_scheduler(opt, 2, tc), 1.0)
    assert "nonfinite" not in row and not bool(torch.isfinite(p).all())


def test_fp16_loss_scaling_overflow_is_not_a_nan_error(tiny_model_dir, tokenizer):
    plan = precision.plan("fp16", "cpu")
    model, records = _tiny(tiny_model_dir, tokenizer, plan)
    tc = config.TrainConfig(lr=1e-2)
    opt = build_optimizer(model, tc)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # scaled fp16 gradients overflow to inf
    row = step(model, [collate(records, pad_id(tokenizer))], opt, build_scheduler(opt, 1, tc), 1.0,
               forward_context(plan, "cpu", False), scaler, guard=True)
    assert row["skipped"] and "nonfinite" not in row  # the scaler skipped it and lowered the scale
    assert scaler.get_scale() == 2.0 ** 119


def test_an_all_masked_batch_is_a_clear_error(tiny_model_dir, tokenizer, tmp_path):
    model, records = _tiny(tiny_model_dir, tokenizer)
    for r in records:
        r.labels = [-100] * len(r.labels)
    cfg = config.Config(train=config.TrainConfig(max_steps=1, micro_batch_size=3, save_every=0))
    with pytest.raises(DataError) as err:
        fit(model, records, [], cfg, pad_id(tokenizer), tmp_path, "cpu", log=lambda *_: None, show_progress=False)
    msg = str(err.value)
    assert msg.startswith("step 1: every label in this step's batch is -100, nothing to train on")
    assert all(f"data.jsonl line {i}" in msg for i in (1, 2, 3))


def test_gradient_clipping_by_config(tiny_model_dir, tokenizer):
    """train.max_grad_norm caps the gradient step() applies; the row keeps the norm before clipping."""
    model, records = _tiny(tiny_model_dir, tokenizer)
    tc = config.TrainConfig(lr=1e-2)
    opt = build_optimizer(model, tc)
    captured = {}

    def spy(optimizer, args, kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        captured["norm"] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))

    opt.register_step_pre_hook(spy)
    row = step(model, [collate(records, pad_id(tokenizer))], opt, build_scheduler(opt, 1, tc), 1e-3, guard=True)
    assert row["grad_norm"] > 1e-3 and captured["norm"] == pytest.approx(1e-3, rel=1e-4)
