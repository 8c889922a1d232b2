"""`slimtune estimate` reads the data as the run's objective reads them (pairs for dpo, unpaired records for kto,
prompts for grpo) and prints the plan and the memory prediction `slimtune train` makes before its model loads:
the same numbers, from the same function (engine/preflight.py); a bad record is train's one-line error."""
from __future__ import annotations

import pytest
import torch
import yaml

from conftest import WORDS, write_jsonl
from slimtune import cli, load_config, models
from slimtune.engine import grpo_memory, precision, preflight, run_plan
from slimtune.train import prepare
from slimtune.ui import forms


class Stop(Exception):
    """Raised by a spy once train has made its prediction: the rest of the run is not needed."""


def _config(tmp, model_dir, objective: str, rows: list[dict], **grpo) -> str:
    data = write_jsonl(tmp / "data.jsonl", rows)
    tree = {"model": {"path": str(model_dir)}, "data": {"train": str(data), "eval_size": 2, "max_len": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "train": {"objective": objective, "output_dir": str(tmp / "run"), "batch_size": 4, "precision": "fp32",
                      "device": "cpu", "max_steps": 1, "save_every": 0}}
    if grpo:
        tree["grpo"] = grpo
    path = tmp / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


PAIRS = [{"prompt": f"Tell me about {w}." + " More." * i, "chosen": f"{w} is nice." * (1 + i % 3),
          "rejected": "No."} for i, w in enumerate(WORDS)]
UNPAIRED = [{"prompt": f"Tell me about {w}." + " More." * i, "completion": f"{w} is nice." * (1 + i % 3),
             "label": i % 2 == 0} for i, w in enumerate(WORDS)]


def _predictions(monkeypatch) -> list:
    """Every Estimate preflight.predict returns, in the order made."""
    seen, real = [], preflight.predict
    monkeypatch.setattr(preflight, "predict", lambda *a: seen.append(real(*a)) or seen[-1])
    return seen


def _train_until_load(cfg: str, monkeypatch) -> None:
    """`slimtune train` up to the model's load, where its prediction is made and printed."""
    monkeypatch.setattr(models, "load", lambda *a, **k: (_ for _ in ()).throw(Stop()))
    with pytest.raises(Stop):
        cli.main(["train", cfg, "--no-progress"])


@pytest.mark.parametrize("objective, rows, noun", [("dpo", PAIRS, "pairs"), ("kto", UNPAIRED, "records")])
def test_estimate_predicts_what_train_predicts(tmp_path, tiny_model_dir, monkeypatch, capsys, objective, rows,
                                               noun):
    cfg = _config(tmp_path, tiny_model_dir, objective, rows)
    seen = _predictions(monkeypatch)
    assert cli.main(["estimate", cfg]) == 0
    shown = capsys.readouterr().out
    _train_until_load(cfg, monkeypatch)
    logged = capsys.readouterr().out
    estimated, trained = seen
    assert estimated.peak == trained.peak > 0 and estimated.activations == trained.activations > 0
    plan = shown[shown.index("batch split:"):shown.index("slimtune estimate:")].strip()
    assert plan.startswith("batch split: 4 records per step as ") and plan in logged  # the same plan
    assert f"slimtune estimate: {objective}, lora, fp32, micro-batch the longest 4 {noun} of " in shown
    assert f"{'predicted peak (reserved)':<28} {trained.peak / 2 ** 30:8.2f} GiB" in shown


def test_estimate_of_grpo_is_the_line_train_logs(tmp_path, tiny_model_dir, monkeypatch, capsys):
    rows = [{"prompt": f"Say something about {w}." + " Please." * (i % 3), "answer": w} for i, w in enumerate(WORDS)]
    cfg = _config(tmp_path, tiny_model_dir, "grpo", rows, num_generations=4, max_new_tokens=8,
                  rewards=["contains:0.1"])
    seen, real = [], grpo_memory.predict

    def spy(*args, **kw) -> tuple:  # estimate's prediction, then train's, logged when its step starts: no further
        est, line = real(*args, **kw)
        seen.append(est)
        if len(seen) == 2:
            print(line)
            raise Stop()
        return est, line
    monkeypatch.setattr(grpo_memory, "predict", spy)
    assert cli.main(["estimate", cfg]) == 0
    shown = capsys.readouterr().out
    with pytest.raises(Stop):
        cli.main(["train", cfg, "--no-progress"])
    logged = capsys.readouterr().out
    estimated, trained = seen
    assert estimated == trained and estimated.weights > 0 and estimated.kv_cache > 0 and estimated.optimizer > 0
    assert "slimtune estimate: grpo, lora, fp32, micro-batch 1 prompt(s) x 4 completions" in shown
    line = next(x for x in shown.splitlines() if x.startswith("grpo memory estimate:"))
    assert line in logged.splitlines() and "sampling 4 completions of up to " in line
    plan = shown[shown.index("batch split:"):shown.index("slimtune estimate:")].strip()
    assert plan.startswith("batch split: 4 records per step as 1 x 4") and plan in logged


def test_estimate_of_grpo_on_two_gpus_samples_one_prompt_per_process(tmp_path, tiny_model_dir, capsys):
    """--gpus 2 with an auto micro-batch: train takes 1 prompt per process (2 a micro-batch), so each process
    samples and trains that prompt's 4 completions, not half of them."""
    rows = [{"prompt": f"Say something about {w}.", "answer": w} for w in WORDS]
    cfg = _config(tmp_path, tiny_model_dir, "grpo", rows, num_generations=4, max_new_tokens=8, rewards=["contains:0.1"])
    assert cli.main(["estimate", cfg, "--gpus", "2", "--budget", "24"]) == 0
    shown = capsys.readouterr().out
    assert "micro-batch 2 prompt(s) x 4 completions" in shown and "sampling 4 completions of up to " in shown, shown
    app = forms.estimate(load_config(cfg, ["train.gpus=2"]), "24GB")  # the web app's estimate, train.gpus=2
    assert "sampling 4 completions of up to " in app["table"], app["table"]
    assert cli.main(["estimate", cfg, "--gpus", "2", "train.micro_batch_size=1"]) == 2  # train refuses it
    assert "train.micro_batch_size=1 on 2 processes" in capsys.readouterr().err


def test_a_bad_pair_is_trains_one_line_error(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, "dpo", PAIRS[:3] + [{"prompt": "Hi", "chosen": "Hello"}] + PAIRS[3:])
    assert cli.main(["estimate", cfg]) == 2
    said = capsys.readouterr().err.strip().split(": error: ", 1)
    assert cli.main(["train", cfg, "--no-progress"]) == 2
    told = capsys.readouterr().err.strip().split(": error: ", 1)
    assert said[0] == "slimtune estimate" and told[0] == "slimtune train"
    assert said[1] == told[1] and said[1].startswith(f"{tmp_path / 'data.jsonl'} line 4") and "rejected" in said[1]
    assert "\n" not in said[1]


def test_the_meta_model_is_the_prepared_models_shapes_and_dtypes(tiny_model_dir):
    """GRPO's estimate reads the weights' bytes: on a GPU plan a bf16 base with fp32 adapter weights, as loaded."""
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "method.target_modules=[q_proj,v_proj]"])
    plan = run_plan.for_estimate(cfg, 2 ** 30)  # a GPU's plan, made here without one
    assert plan.precision.weights == torch.bfloat16 and plan.precision.trainable == torch.float32
    loaded, _ = models.load(str(tiny_model_dir), precision.base_dtype_name(cfg, plan.device, plan.precision))
    real = prepare(loaded, cfg, "cpu", lambda _: None, plan=plan).model
    shapes = lambda m: sorted((n, p.dtype, tuple(p.shape), p.requires_grad) for n, p in m.named_parameters())  # noqa: E731
    assert shapes(preflight.meta_model(cfg, plan)) == shapes(real)
    assert {p.dtype for p in real.parameters()} == {torch.bfloat16, torch.float32}
