"""A short DPO run on a tiny random model trains on its pairs: the loss falls and the reward accuracy rises,
logged in metrics.jsonl through the loop's own rows."""
from __future__ import annotations

import json

import pref_train
import torch
import yaml

from conftest import make_model
from pairs_fixture import pref, random_pairs
from slimtune import config as config_mod
from slimtune import cli, methods
from slimtune.objectives import needs_reference
from slimtune.runs.metrics_log import read_metrics
from slimtune.engine import preflight
from slimtune.engine.loop import fit
from slimtune.engine.preference_step import PairObjective, items


def _cfg(out, **over):
    base = {"method.name": "lora", "method.r": 4, "method.alpha": 8, "method.dropout": 0.0,
            "method.target_modules": "[q_proj,v_proj]", "train.objective": "dpo", "train.lr": 1e-2,
            "train.micro_batch_size": 4, "train.grad_accum": 2, "train.max_steps": 12, "train.warmup_steps": 0,
            "train.precision": "fp32", "train.device": "cpu", "train.output_dir": str(out), "train.log_every": 1,
            "data.max_len": 64}
    return config_mod.load(None, [f"{k}={v}" for k, v in {**base, **over}.items()])


def dpo_run(out, objective="dpo", steps=12, **over):
    cfg = _cfg(out, **{"train.objective": objective, "train.max_steps": steps, **over})
    torch.manual_seed(0)
    model = methods.apply(make_model(400, seed=7), cfg.method)
    train = items(random_pairs(16, seed=11, label=objective == "kto"), objective)
    step = PairObjective(objective, pref(beta=0.5), "adapter_off" if needs_reference(objective) else "none", pad=0)
    result = fit(model, train, [], cfg, 0, out, "cpu", log=lambda *_: None, show_progress=False, objective=step)
    return result, [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def test_dpo_lowers_its_loss_and_raises_reward_accuracy(tmp_path):
    _, rows = dpo_run(tmp_path / "run")
    first, last = rows[0], rows[-1]
    assert len(rows) == 12
    assert abs(first["loss"] - 0.6931) < 1e-3  # the adapter starts at zero: the policy is the reference, log 2
    assert first["rewards/margins"] == 0.0 and first["rewards/accuracy"] == 0.0
    assert last["loss"] < 0.45 and last["rewards/accuracy"] >= 0.85 and last["rewards/margins"] > 0.5
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "grad_norm"):
        assert key in last
    assert first["trained_tokens"] > 0


def test_every_objective_trains(tmp_path):
    for objective in ("ipo", "simpo", "orpo", "kto"):
        _, rows = dpo_run(tmp_path / objective, objective, steps=6)
        assert rows[-1]["loss"] < rows[0]["loss"], objective


def _run_config(tmp, model_dir, **train) -> str:
    data = tmp / "pairs.jsonl"  # named for the run's checks; the records come from pref_train.built
    data.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    tree = {"model": {"path": str(model_dir)}, "data": {"train": str(data), "max_len": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "train": {"output_dir": str(tmp / "run"), "objective": "dpo", "lr": 1e-2, "warmup_steps": 0,
                      "max_steps": 6, "micro_batch_size": 4, "precision": "fp32", "device": "cpu", **train},
            "preference": {"beta": 0.5}}
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_slimtune_train_writes_preference_metrics_and_eval(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(preflight, "build_pairs", pref_train.built)
    assert cli.main(["train", _run_config(tmp_path, tiny_model_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "run"
    rows = read_metrics(run / "metrics.jsonl")
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 6]
    before, after = evals
    assert before["eval_rewards/margins"] == 0.0 and abs(before["eval_loss"] - 0.6931) < 1e-3
    assert after["eval_loss"] < before["eval_loss"]
    assert "eval_rewards/accuracy" in after and "eval_logps/chosen" in after
    assert f"preference accuracy {after['eval_rewards/accuracy']:.3f}" in out
    scores = json.loads((run / "eval" / "scores.json").read_text())
    assert scores["objective"] == "dpo" and scores["reference"] == "adapter_off" and scores["records"] == 4
    assert (run / "adapter_model.safetensors").is_file() and not (run / "reference_logps.safetensors").exists()


def test_refused_combinations_stop_before_the_model_loads(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setattr(preflight, "build_pairs", pref_train.built)
    cfg = _run_config(tmp_path, tiny_model_dir)
    assert cli.main(["train", cfg, "method.name=full", "train.reference=adapter_off", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # method.r: warnings
    assert err == ["slimtune train: error: train.reference=adapter_off with method.name=full: full trains the "
                   "model's own weights, there is no adapter to switch off; use train.reference=precomputed or copy"]
    assert not (tmp_path / "run").exists()
