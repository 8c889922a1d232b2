"""The run plan (engine/run_plan.py): resolved once per run, the same text wherever it is printed, frozen."""
from __future__ import annotations

import dataclasses
import shutil

import pytest
import yaml

import slimtune
from conftest import WORDS, lora_run_config
from slimtune import cli, config
from slimtune.engine import run_plan


@pytest.fixture
def counted(monkeypatch) -> list[run_plan.RunPlan]:
    """Every plan run_plan.resolve returns, in order: its callers reach it through the module."""
    plans, real = [], run_plan.resolve

    def resolve(*args, **kwargs) -> run_plan.RunPlan:
        plans.append(real(*args, **kwargs))
        return plans[-1]
    monkeypatch.setattr(run_plan, "resolve", resolve)
    return plans


def test_slimtune_train_resolves_the_plan_once(tmp_path, tiny_model_dir, counted, capsys):
    """Three steps with a held-out split (the in-training eval reads the plan's loss too): one resolve, and
    the run trains with the split it printed."""
    cfg = lora_run_config(tmp_path, tiny_model_dir, "run", max_steps=3, batch_size=8)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    assert len(counted) == 1
    plan = counted[0]
    assert (plan.batch_size, plan.micro_batch_size, plan.grad_accum) == (8, 8, 1)  # the CPU's rule for 8 records
    assert plan.describe() in capsys.readouterr().out
    saved = config.load(tmp_path / "run" / "config.yaml").train
    assert (saved.micro_batch_size, saved.grad_accum) == (8, 1)


def test_slimtune_fit_resolves_the_plan_once(tmp_path, tiny_model_dir, tokenizer, counted):
    from transformers import AutoModelForCausalLM

    from slimtune.data import encode_examples
    from slimtune.data.readers import from_alpaca

    cfg = slimtune.load_config(overrides=[f"model.path={tiny_model_dir}", "method.target_modules=q_proj,v_proj",
                                          "method.r=4", "train.max_steps=2", "train.batch_size=4",
                                          "train.precision=fp32", "train.save_every=0",
                                          f"train.output_dir={tmp_path / 'run'}"])
    records, _ = encode_examples([from_alpaca({"instruction": f"About {w}.", "output": f"{w} is nice."}, w)
                                  for w in WORDS], tokenizer, cfg.data)
    model = slimtune.prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg, log=lambda *a: None).model
    lines: list[str] = []
    result = slimtune.fit(model, records[:6], cfg, eval_data=records[6:], log=lines.append)
    assert len(counted) == 1 and result["steps"] == 2
    assert counted[0].describe() in lines


def test_estimate_train_and_the_web_app_print_the_same_plan(tmp_path, tiny_model_dir, counted, capsys):
    pytest.importorskip("fastapi", reason="the web app's extra is not installed: pip install 'slimtune[ui]'")
    from fastapi.testclient import TestClient

    from slimtune.ui.paths import Roots
    from slimtune.ui.server import create_app

    shutil.copytree(tiny_model_dir, tmp_path / "tiny")  # inside the web app's roots
    path = lora_run_config(tmp_path, tmp_path / "tiny", "run", max_steps=2, batch_size=8, packing="on")
    assert cli.main(["estimate", str(path)]) == 0
    estimated = capsys.readouterr().out
    assert cli.main(["train", str(path), "--no-progress"]) == 0
    trained = capsys.readouterr().out
    assert len(counted) == 1  # estimate and the web app resolve through run_plan.for_estimate
    text = counted[0].describe()
    assert text.startswith("batch split: 8 records per step as 8 x 1 (micro_batch_size x grad_accum); on the CPU")
    assert "run plan: cpu, 1 process; precision fp32 (base fp32, trainable fp32); checkpointing off" in text
    assert "loss plain; packing bins; fast paths: none" in text  # train.packing=on packs on the CPU too
    assert text in trained and estimated.startswith(text + "\n")
    client = TestClient(create_app(Roots.at(tmp_path)), base_url="http://127.0.0.1")
    answer = client.post("/api/estimate", json={"tree": yaml.safe_load(path.read_text())})
    assert answer.status_code == 200 and answer.json()["plan"] == text


def test_the_plan_is_frozen(tiny_model_dir):
    plan = run_plan.resolve(config.load(None, [f"model.path={tiny_model_dir}", "train.precision=fp32"]), "cpu")
    for record, name, value in ((plan, "device", "cuda"), (plan, "checkpointing", True),
                                (plan.kernels, "chunked_loss", True), (plan.precision, "name", "bf16"),
                                (plan.split, "batch_size", 64), (plan.split.chosen, "micro_batch_size", 64)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(record, name, value)
    with pytest.raises(AttributeError):
        plan.micro_batch_size = 64  # read from the split, never set
    assert (plan.device, plan.checkpointing, plan.chunked_loss, plan.micro_batch_size) == ("cpu", False, False, 4)


def test_prefix_tuning_plans_without_checkpointing_and_says_why(tiny_model_dir):
    cfg = config.load(None, [f"model.path={tiny_model_dir}", "train.precision=fp32", "method.name=prefix_tuning",
                             "train.gradient_checkpointing=true", "train.micro_batch_size=2"])
    plan = run_plan.resolve(cfg, "cpu")
    assert not plan.checkpointing and plan.apply(cfg).train.gradient_checkpointing  # config.yaml keeps what was asked
    assert plan.describe().endswith("note: train.gradient_checkpointing is off for prefix_tuning: checkpointed "
                                    "layers would drop the learned prefix (its keys/values travel as a KV cache)")


def test_the_processes_object_answers_for_one_process_and_speaks_only_from_rank_0():
    from slimtune.engine.distributed import Processes

    one, lines = Processes("cpu"), []
    assert one.is_main and not one.several and one.load_device == "cpu"
    assert one.all_reduce([2.0, 3.0]) == [2.0, 3.0] and one.broadcast({"a": 1}) == {"a": 1}
    one.barrier()
    one.refuse("qlora")  # one process: qlora trains as ever
    one.log(lines.append)("said")
    second = Processes("cuda:1", rank=1, world_size=2)
    second.log(lines.append)("not said")  # rank 0 speaks for the run
    assert lines == ["said"] and not second.is_main and second.load_device == "cpu"  # FSDP2 moves each layer
    with pytest.raises(config.ConfigError, match=r"^method.name=qlora on 2 processes: a bitsandbytes 4-bit base"):
        second.refuse("qlora")


def test_several_processes_are_in_the_plan_and_its_text(tiny_model_dir):
    cfg = config.load(None, [f"model.path={tiny_model_dir}", "train.precision=fp32", "train.micro_batch_size=2"])
    plan = run_plan.resolve(cfg, "cpu", world_size=2, rank=1)
    assert plan.fsdp and (plan.world_size, plan.rank) == (2, 1)
    assert "run plan: cpu, 2 processes (FSDP2); precision fp32" in plan.describe()
