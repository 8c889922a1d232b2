"""Numeric guards: a NaN/inf loss or gradient stops the run (or skips the step) with a message naming the step,
the batch's records and the likely cause; fp16 loss-scaling overflow stays the GradScaler's business."""
from __future__ import annotations

import json
import math
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
from slimtune.engine import guards, precision
from slimtune.runs import checkpoint
from slimtune.runs.metrics_log import read_metrics
from slimtune.engine.loop import fit, forward_context, step
from slimtune.engine.optim import build_optimizer, build_scheduler

NAN = float("nan")


def _config(tmp: Path, model_dir: Path, **train) -> Path:
    return lora_run_config(tmp, model_dir, "run", copies=2, data={"eval_size": 0}, method={"dropout": 0.0},
                           **{"max_steps": 6, "micro_batch_size": 4, "warmup_steps": 0, "save_every": 1, **train})


@pytest.fixture
def nan_at_step_3(monkeypatch):
    """The loss of step 3's batch turns NaN (one micro-batch per step; eval has its own loss function)."""
    import slimtune.engine.step as loop  # where each micro-batch's loss is taken

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
    cfg = _config(tmp_path, tiny_model_dir, on_nan="skip", max_skipped_share=0.2)  # 1 of 6 steps: 17%
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


def _tiny(tiny_model_dir, tokenizer, plan=precision.choose_dtypes("fp32", "cpu")):
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
    plan = precision.choose_dtypes("fp16", "cpu")
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


# --- a broken run is never reported as a success (issue 15 items 7 and 8) ---

@pytest.fixture
def nan_after_step_1(monkeypatch):
    """Every loss after the first step's turns NaN."""
    import slimtune.engine.step as loop

    real, calls = loop.token_loss_sum, []

    def poisoned(model, batch, chunked=False):
        calls.append(1)
        s, n = real(model, batch, chunked)
        return (s * NAN if len(calls) > 1 else s), n

    monkeypatch.setattr(loop, "token_loss_sum", poisoned)


def test_on_nan_skip_that_skips_most_steps_fails_without_an_adapter(tmp_path, tiny_model_dir, nan_after_step_1,
                                                                    capsys):
    cfg = _config(tmp_path, tiny_model_dir, on_nan="skip", max_steps=10, save_every=0)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert ("slimtune train: error: train.on_nan=skip skipped 9 of 10 steps for a NaN/inf loss or gradient, more than "
            "train.max_skipped_share=0.1 allows, so the adapter was not saved") in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    # metrics.jsonl stays strict JSON: the NaN losses are null, with the reason beside them
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=_refuse) for line in lines]
    skipped = [r for r in rows if r.get("nan_skipped")]
    assert len(skipped) == 9 and all(r["loss"] is None and "loss" in r["null_reasons"] for r in skipped)


def _refuse(name):
    raise AssertionError(f"{name} is not JSON")


def test_nan_weights_are_never_saved(tmp_path, tiny_model_dir, tokenizer, monkeypatch):
    """An update that leaves NaN in the trained weights (finite loss and gradient) writes no checkpoint."""
    import slimtune.engine.loop as loop

    model, records = _tiny(tiny_model_dir, tokenizer)
    real = loop.step

    def breaks_the_weights(model, *args, **kwargs):
        row = real(model, *args, **kwargs)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "lora_B" in n)[0, 0] = NAN
        return row

    monkeypatch.setattr(loop, "step", breaks_the_weights)
    cfg = config.Config(train=config.TrainConfig(max_steps=1, micro_batch_size=3, save_every=0))
    with pytest.raises(guards.NumericError) as err:
        fit(model, records, [], cfg, pad_id(tokenizer), tmp_path, "cpu", log=lambda *_: None, show_progress=False)
    assert str(err.value).startswith("step 1: the trained weight base_model.model.model.layers.0.self_attn.q_proj."
                                     "lora_B.default.weight holds NaN/inf (1 tensors do), so no checkpoint or adapter "
                                     "was written; no checkpoint was written yet")
    assert checkpoint.latest(tmp_path) is None


def test_divergence_is_named_with_the_last_sane_checkpoint_and_resume_takes_a_new_lr(
        tmp_path, tiny_model_dir, nan_at_step_3, capsys, monkeypatch):
    """lr=1e37 after two sane steps: step 3's update makes the weights ~1e37 (finite, checkpointed), step 4's
    forward pass overflows. The message blames divergence, not records, and points at step 2; --resume with
    a lower train.lr then goes on from there and trains at that lr."""
    monkeypatch.setattr(config.checks, "LR_MAX", float("inf"))  # the guard behind the config's lr <= 10
    cfg = _config(tmp_path, tiny_model_dir, scheduler="constant", keep_checkpoints=0)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 2  # the poisoned step 3 stops it at step 2
    capsys.readouterr()
    assert cli.main(["train", str(cfg), "--no-progress", "--resume", "train.lr=1e37"]) == 2
    out, err = capsys.readouterr()
    assert "train.lr is 1e+37 now (0.01 in the checkpoint): the schedule goes on from step 2" in out
    assert "slimtune train: error: step 4: the loss is" in err
    assert "Likely cause: training diverged: the trainable weights grew to max |w| " in err
    assert "the batch's records are not the cause" in err and "check these records" not in err
    root = tmp_path / "run" / checkpoint.ROOT
    assert (f"the last sane checkpoint is {root / 'step-000002'}; the newer step-000003 (max |w| " in err
            and f"hold diverged weights, so move them out of {root}, then slimtune train CONFIG --resume "
            "train.lr=<lower> goes on from it" in err)
    assert guards.checkpoint_max(root / "step-000003") > 1e30 > 1 > guards.checkpoint_max(root / "step-000002")
    import shutil

    shutil.rmtree(root / "step-000003")
    assert cli.main(["train", str(cfg), "--no-progress", "--resume", "train.lr=5e-3"]) == 0
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [(r["step"], r["lr"]) for r in rows] == [(1, 1e-2), (2, 1e-2), (3, 5e-3), (4, 5e-3), (5, 5e-3), (6, 5e-3)]
    weights = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert all(bool(torch.isfinite(w).all()) for w in weights.values())


def test_huge_finite_weights_are_divergence_not_a_bad_record(tiny_model_dir, tokenizer):
    model, _ = _tiny(tiny_model_dir, tokenizer)
    start = guards.trainable_max(model)
    assert 0 < start < 1
    assert guards.likely_cause("loss", model, "fp32", 1e-4, [], start).startswith("the forward pass made a NaN")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.fill_(3.3e37)
    cause = guards.likely_cause("loss", model, "fp32", 1e38, [], start)
    assert cause.startswith(f"training diverged: the trainable weights grew to max |w| 3.3e+37 from {start:.3g}")
    assert "Lower train.lr (now 1e+38)" in cause


@pytest.mark.parametrize("item, line", [("train.lr=inf", "train.lr: must be a finite number, got inf"),
                                        ("train.adam_eps=0", "train.adam_eps: must be positive")])
def test_the_settings_that_trained_an_all_nan_adapter_are_refused(tmp_path, tiny_model_dir, capsys, item, line):
    assert cli.main(["train", str(_config(tmp_path, tiny_model_dir)), "--no-progress", item]) == 2
    assert capsys.readouterr().err.startswith(f"slimtune train: error: {line}")
    assert not (tmp_path / "run").exists()


def test_a_run_ending_on_a_nan_loss_fails_naming_the_finite_checkpoint(tmp_path, tiny_model_dir, monkeypatch,
                                                                        capsys):
    import slimtune.engine.step as loop

    real, calls = loop.token_loss_sum, []

    def last_is_nan(model, batch, chunked=False):
        calls.append(1)
        s, n = real(model, batch, chunked)
        return (s * NAN if len(calls) == 6 else s), n

    monkeypatch.setattr(loop, "token_loss_sum", last_is_nan)
    cfg = _config(tmp_path, tiny_model_dir, on_nan="skip", max_skipped_share=0.5)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 2
    last = tmp_path / "run" / checkpoint.ROOT / "step-000006"
    assert capsys.readouterr().err.endswith(
        "error: the last step's loss is nan (not finite; train.on_nan=skip skipped its update), and a run that ends on "
        f"a non-finite loss is not reported as a success: the adapter was not saved. The checkpoint {last} holds the "
        "finite weights before it (chat, merge and eval take that folder)\n")
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert all(bool(torch.isfinite(w).all()) for w in load_file(last / checkpoint.RAW).values())


def test_a_nan_held_out_loss_fails_and_scores_json_stays_json(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The issue's run: "eval_loss": NaN in scores.json (not JSON) and exit 0."""
    import slimtune.evaluate.report as report

    monkeypatch.setattr(report, "eval_loss", lambda *a, **k: {"eval_loss": NAN, "eval_ppl": NAN, "eval_tokens": 9})
    cfg = lora_run_config(tmp_path, tiny_model_dir, "run", max_steps=2)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 2
    scores_path = tmp_path / "run" / "eval" / "scores.json"
    assert capsys.readouterr().err.endswith(f"error: the held-out loss after training is nan (not finite; "
                                            f"{scores_path} says why), so the adapter was not saved\n")
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
    scores = json.loads(scores_path.read_text(), parse_constant=_refuse)
    assert scores["eval_loss"] is None and scores["null_reasons"]["eval_loss"].startswith("nan: the model's loss")


# --- issue 27 item 8: an lr past any sane range is refused; a blown-up adapter never passes for a trained one ---

@pytest.mark.parametrize("lr", ["1e38", "1e30", "11"])
def test_an_lr_above_10_is_refused_before_anything_loads(tmp_path, tiny_model_dir, capsys, lr):
    """lr=1e38 passed validation and AdamW failed with `value cannot be converted to type float`."""
    assert cli.main(["train", str(_config(tmp_path, tiny_model_dir)), "--no-progress", f"train.lr={lr}"]) == 2
    assert capsys.readouterr().err == (f"slimtune train: error: train.lr: {float(lr):g} is above 10: AdamW moves "
                                       "each weight by about lr per step, so such an lr only diverges; use 1e-6 to "
                                       "1e-2 (prompt tuning: up to 0.3)\n")
    assert not (tmp_path / "run").exists()


def test_a_saturated_adapter_fails_with_the_divergence_diagnosis(tiny_model_dir, tokenizer, tmp_path):
    """lr=1e30 (a Config built in code skips the range check): every loss after step 1 is ln(vocab) exactly and
    the run exited 0 with the adapter. Now the end of the run names the divergence and writes no adapter."""
    model, records = _tiny(tiny_model_dir, tokenizer)
    start = guards.trainable_max(model)
    cfg = config.Config(train=config.TrainConfig(lr=1e30, max_steps=3, micro_batch_size=3, warmup_steps=0,
                                                 save_every=0))
    lines = []
    with pytest.raises(guards.NumericError) as err:
        fit(model, records, [], cfg, pad_id(tokenizer), tmp_path, "cpu", log=lines.append, show_progress=False)
    text, vocab = str(err.value), model.config.vocab_size
    assert text.startswith("training diverged: the trainable weights grew to max |w| ")
    assert f"from {start:.3g} before the first step, and the last train loss is {math.log(vocab):.4f} " \
           f"(ln(vocab) = {math.log(vocab):.4f}, a uniform guess): the adapter predicts nothing. Lower train.lr " \
           "(now 1e+30)" in text
    assert "the adapter was not saved. every checkpoint holds diverged weights (step-000003 (max |w| " in text
    assert guards.trainable_max(model) > 1e3 * max(start, 1)


def test_a_uniform_last_loss_is_warned_about(tiny_model_dir, tokenizer):
    model, _ = _tiny(tiny_model_dir, tokenizer)
    ln = math.log(model.config.vocab_size)
    assert guards.uniform(model, ln + 1e-5).startswith(f"warning: the last train loss {ln:.4f} is ln(vocab) = "
                                                       f"{ln:.4f}, the loss of giving every token the same probability")
    assert guards.uniform(model, ln - 0.01) is None and guards.uniform(model, None) is None
