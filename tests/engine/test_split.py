"""train.batch_size and the split slimtune picks for it (engine/split.py): the same numbers whatever the split,
a deterministic printed choice for a given free-memory figure, explicit splits honoured, resumes kept."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import lora_run_config
from slimtune import cli, config
from slimtune.config import ConfigError
from slimtune.engine import split
from slimtune.runs import checkpoint
from slimtune.runs.metrics_log import read_metrics
from slimtune.engine.memory import GIB

# 32 records of ~52 tokens, no held-out split, 3 steps of 16 records (the third starts the second epoch);
# no dropout, so the split is the only thing that differs between runs
RUN = dict(data={"eval_size": 0}, method={"dropout": 0.0}, max_steps=3)


def _train(tmp_path, tiny_model_dir, name, **train):
    cfg = lora_run_config(tmp_path, tiny_model_dir, name, **{**RUN, **train})
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / name
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    return losses, load_file(run / "adapter_model.safetensors"), yaml.safe_load((run / "config.yaml").read_text())


def test_auto_split_trains_the_same_numbers_as_16x1_and_8x2(tmp_path, tiny_model_dir, capsys):
    auto = _train(tmp_path, tiny_model_dir, "auto", batch_size=16)
    out = capsys.readouterr().out
    assert "batch split: 16 records per step as 8 x 2 (micro_batch_size x grad_accum); on the CPU" in out
    assert {k: auto[2]["train"][k] for k in ("batch_size", "micro_batch_size", "grad_accum")} == \
        {"batch_size": 16, "micro_batch_size": 8, "grad_accum": 2}  # config.yaml holds the split it trained with
    one = _train(tmp_path, tiny_model_dir, "16x1", micro_batch_size=16, grad_accum=1)
    two = _train(tmp_path, tiny_model_dir, "8x2", micro_batch_size=8, grad_accum=2)
    out = capsys.readouterr().out  # an explicit split is printed as configured, not as chosen
    assert "as 16 x 1 (micro_batch_size x grad_accum); as configured" in out and "fewest micro-batches" not in out
    assert len(auto[0]) == 3 and auto[0][0] > auto[0][2]  # three steps that trained
    for losses, adapter, _ in (one, two):
        # fp32: the loss is a sum over the step's trained tokens divided by their count, whatever the split;
        # only the summation order (and the padding width) differs
        assert losses == pytest.approx(auto[0], abs=1e-5)
        assert adapter.keys() == auto[1].keys()
        assert all(torch.allclose(adapter[k], auto[1][k], atol=1e-5) for k in adapter)


def _cfg(tiny_model_dir, **train) -> config.Config:
    cfg = config.Config()
    cfg.model.path = str(tiny_model_dir)
    # LoRA dropout: peft's own layers, the padded engine (no offload); tests that want the fast engine set 0
    cfg.method = config.MethodConfig(r=4, dropout=0.05, target_modules=["q_proj", "v_proj"])
    cfg.train = config.TrainConfig(**{"precision": "bf16", **train})
    cfg.data.max_len = 512
    return cfg


def test_gpu_choice_is_deterministic_fewest_micro_batches_leanest_mode_and_printed(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, batch_size=16)
    roomy = split.choose(cfg, "cuda", free=80 * GIB)
    assert roomy == split.choose(cfg, "cuda", free=80 * GIB)
    assert (roomy.chosen.micro_batch_size, roomy.chosen.grad_accum) == (16, 1)
    assert roomy.chosen.gradient_checkpointing and roomy.rejected == ()  # lean even with room to spare
    # just too little room for 16 x 1: the next split, 8 x 2, with the same mode
    first = roomy.chosen.peak
    tight = split.choose(cfg, "cuda", free=first / (1 - split.MARGIN) - 1)
    assert [o.peak for o in tight.rejected] == [first]
    assert (tight.chosen.micro_batch_size, tight.chosen.gradient_checkpointing) == (8, True)
    assert tight.chosen.peak < first
    assert tight == split.choose(cfg, "cuda", free=first / (1 - split.MARGIN) - 1)
    text = tight.describe()
    assert text.startswith("batch split: 16 records per step as 8 x 2, checkpointing (micro_batch_size x "
                           "grad_accum); the fewest micro-batches that fit, with checkpointing")
    assert f"predicted peak {tight.chosen.peak / GIB:.2f} GiB of {tight.free / GIB:.2f} GiB free" in text
    assert f"rejected 16 x 1, checkpointing: predicted {first / GIB:.2f} GiB, over the budget" in text


def test_gpu_choice_offloads_on_the_fast_engine(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, batch_size=16)
    cfg.method.dropout = 0.0  # fused LoRA layers: the fast engine, whose estimate models offload
    if not split.memory.fast_engine(cfg):
        pytest.skip("this config is not on the fast engine")
    got = split.choose(cfg, "cuda", free=80 * GIB)
    assert (got.chosen.micro_batch_size, got.chosen.gradient_checkpointing, got.chosen.offload_activations) \
        == (16, True, True)


def test_offloaded_inputs_the_cpu_cannot_hold_stay_on_the_gpu(tiny_model_dir, monkeypatch):
    from transformers import AutoConfig

    from slimtune.train import _host_line

    cfg = _cfg(tiny_model_dir, batch_size=16)
    cfg.method.dropout = 0.0
    if not split.memory.fast_engine(cfg):
        pytest.skip("this config is not on the fast engine")
    mcfg = AutoConfig.from_pretrained(tiny_model_dir)
    monkeypatch.setattr(split.host_memory, "available", lambda: 64 * GIB)
    roomy = split.choose(cfg, "cuda", free=80 * GIB).chosen
    # each layer's input, bf16, for the 16 records of max_len tokens
    assert roomy.offload_activations and roomy.host == 16 * 512 * mcfg.num_hidden_layers * mcfg.hidden_size * 2
    monkeypatch.setattr(split.host_memory, "available", lambda: roomy.host)  # less the margin: too little
    kept = split.choose(cfg, "cuda", free=80 * GIB)
    assert (kept.chosen.micro_batch_size, kept.chosen.gradient_checkpointing, kept.chosen.offload_activations,
            kept.chosen.host) == (16, True, False, 0.0)
    assert kept.chosen.peak > roomy.peak and "layer inputs kept on the GPU" in kept.why
    cfg.train.offload_activations = True  # the user's own choice stays, and the run warns
    assert split.choose(cfg, "cuda", free=80 * GIB).chosen.offload_activations
    said = []
    _host_line(roomy.host, roomy.host / 2, said.append)
    assert said[0].startswith(f"predicted CPU memory for the offloaded layer inputs: {roomy.host / GIB:.2f} GiB")
    assert said[1].startswith("warning:") and "train.offload_activations=false" in said[1]


def test_gpu_choice_splits_when_one_micro_batch_cannot_fit(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, batch_size=16)
    peaks = {o: split._estimated(cfg, split.Option(*o), None, 1).peak
             for o in [(16, 1, True, False), (8, 2, True, False), (4, 4, True, False)]}
    free = peaks[(4, 4, True, False)] / (1 - split.MARGIN)
    assert peaks[(16, 1, True, False)] > peaks[(8, 2, True, False)] > peaks[(4, 4, True, False)]
    got = split.choose(cfg, "cuda", free=free)
    assert got.chosen == split.Option(4, 4, True, False, peaks[(4, 4, True, False)])
    assert [o.micro_batch_size for o in got.rejected] == [16, 8]  # each faster split, over the budget
    nothing = split.choose(cfg, "cuda", free=1.0)  # 1 byte: the smallest predicted peak, said so
    assert nothing.chosen.micro_batch_size == 1 and nothing.chosen.gradient_checkpointing
    assert "nothing is predicted to fit" in nothing.why


def test_user_switches_stay_on_and_bad_shapes_fall_back(tiny_model_dir):
    on = split.choose(_cfg(tiny_model_dir, batch_size=16, gradient_checkpointing=True), "cuda", free=80 * GIB)
    assert on.chosen.gradient_checkpointing and on.chosen.micro_batch_size == 16
    broken = _cfg(tiny_model_dir, batch_size=16)
    broken.model.path = str(tiny_model_dir / "missing")
    fallback = split.choose(broken, "cuda", free=80 * GIB)
    assert (fallback.chosen.micro_batch_size, fallback.chosen.grad_accum) == (8, 2)
    assert fallback.why.startswith("memory estimate unavailable")


@pytest.mark.parametrize("batch, want", [(16, (8, 2)), (12, (6, 2)), (7, (7, 1)), (4, (4, 1)), (13, (1, 13))])
def test_cpu_rule(batch, want):
    got = split.choose(config.from_dict({"train": {"batch_size": batch}}), "cpu")
    assert (got.chosen.micro_batch_size, got.chosen.grad_accum) == want and got.chosen.peak is None


def test_batch_size_defaults_and_explicit_splits():
    default = config.from_dict({})
    assert (default.train.batch_size, default.train.micro_batch_size, default.train.grad_accum) == ("auto",) * 3
    assert split.records_per_step(default.train) == 4  # as many records a step as before batch_size existed
    old = config.from_dict({"train": {"micro_batch_size": 8, "grad_accum": 2}})
    assert split.records_per_step(old.train) == 16 and not split.is_auto(old.train)
    resolved = split.resolve(old, "cuda", log=pytest.fail)  # honoured as written, nothing estimated or printed
    assert (resolved.train.batch_size, resolved.train.micro_batch_size, resolved.train.grad_accum) == (16, 8, 2)
    half = split.resolve(config.from_dict({"train": {"batch_size": 12, "grad_accum": 3}}), "cuda", log=pytest.fail)
    assert (half.train.micro_batch_size, half.train.grad_accum) == (4, 3)
    only = split.resolve(config.from_dict({"train": {"micro_batch_size": 2}}), "cpu", log=pytest.fail)
    assert (only.train.batch_size, only.train.grad_accum) == (2, 1)


@pytest.mark.parametrize("train, words", [
    ({"batch_size": 16, "micro_batch_size": 8, "grad_accum": 4},
     "train.batch_size=16 disagrees with train.micro_batch_size=8 x train.grad_accum=4 (32)"),
    ({"batch_size": 10, "micro_batch_size": 4}, "train.micro_batch_size=4 does not divide train.batch_size=10"),
    ({"batch_size": 10, "grad_accum": 4}, "train.grad_accum=4 does not divide train.batch_size=10"),
    ({"micro_batch_size": "many"}, "train.micro_batch_size: expected a whole number or auto"),
])
def test_disagreeing_split_fields_are_a_config_error(tmp_path, train, words):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": train}))
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert words in str(err.value)


def test_overrides_take_auto_and_numbers(tmp_path):
    cfg = config.load(None, ["train.batch_size=32", "train.micro_batch_size=auto", "train.grad_accum=auto"])
    assert (cfg.train.batch_size, cfg.train.micro_batch_size) == (32, "auto")
    assert config.load(None, ["train.micro_batch_size=16"]).train.micro_batch_size == 16


def test_resume_adopts_the_checkpoints_split(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """An auto split resumes as it started, even where the plan would now choose another."""
    import slimtune.engine.loop as loop

    ref = _train(tmp_path, tiny_model_dir, "ref", batch_size=16)
    real, calls = loop.step, []

    def stopped(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    cfg = lora_run_config(tmp_path, tiny_model_dir, "run", **{**RUN, "batch_size": 16})
    monkeypatch.setattr(loop, "step", stopped)
    assert cli.main(["train", str(cfg), "--no-progress"]) == 128 + signal.SIGTERM.value
    monkeypatch.setattr(loop, "step", real)
    monkeypatch.setattr(split, "CPU_MICRO", 4)  # a fresh plan would now pick 4 x 4
    saved = config.load(checkpoint.latest(tmp_path / "run") / "config.yaml")
    assert checkpoint.differences(saved, config.load(cfg)) == []  # the auto split compares as the saved one
    assert cli.main(["train", str(cfg), "--resume", "--no-progress"]) == 0
    run = tmp_path / "run"
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["micro_batch_size"] == 8
    assert [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == ref[0]


def test_estimate_prints_the_split_train_would_choose(tmp_path, tiny_model_dir, capsys, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"model": {"path": str(tiny_model_dir)}, "data": {"max_len": 512},
                                    "method": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
                                    "train": {"batch_size": 16, "precision": "bf16"}}))
    cfg = config.load(path)
    roomy = split.choose(cfg, "cuda", free=80 * GIB).chosen.peak
    budget = roomy / (1 - split.MARGIN) - 1  # 16 x 1 just misses
    want = split.choose(cfg, "cuda", free=budget)
    assert cli.main(["estimate", str(path), "--budget", f"{budget / 2 ** 20:.6f}MiB"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(want.describe() + "\n")
    assert "as 8 x 2, checkpointing" in out and "checkpointing on" in out  # the estimate is of the chosen split
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["estimate", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("batch split: 16 records per step as 8 x 2 (micro_batch_size x grad_accum); no GPU here "
                          "and no --budget")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads the GPU's free memory (torch.cuda.mem_get_info)")
def test_gpu_free_memory_is_what_the_plan_fits(tiny_model_dir):
    free, _ = torch.cuda.mem_get_info()
    measured = split.free_memory("cuda")
    assert free <= measured <= free + torch.cuda.memory_reserved() + 2 ** 20
    got = split.choose(_cfg(tiny_model_dir, batch_size=16), "cuda")
    assert got.chosen.micro_batch_size == 16 and got.chosen.peak <= got.budget  # a tiny model fits in one


def test_a_model_built_in_code_is_estimated_from_its_own_config(tiny_model_dir, tokenizer):
    from conftest import make_model

    cfg = _cfg(tiny_model_dir, batch_size=16)
    same = split.choose(cfg, "cuda", free=80 * GIB, model=make_model(len(tokenizer)))
    assert same == split.choose(cfg, "cuda", free=80 * GIB)  # model.path's shape: the same estimate
    wider = make_model(len(tokenizer) + 4096)  # a larger vocabulary: more weights and logits
    other = split.choose(cfg, "cuda", free=80 * GIB, model=wider)
    assert other.chosen.peak is not None and other.chosen.peak > same.chosen.peak
    assert other == split.choose(replace_path(cfg, "embedded-nowhere"), "cuda", free=80 * GIB, model=wider)
    # a module with no transformers config: model.path's shape is all there is; another path -> the CPU's rule
    bare = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lost = split.choose(replace_path(cfg, str(tiny_model_dir / "missing")), "cuda", free=80 * GIB, model=bare)
    assert (lost.chosen.micro_batch_size, lost.chosen.peak) == (8, None)
    assert "gives no config.json" in lost.why


def replace_path(cfg, path: str):
    import dataclasses

    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=path))


def test_long_micro_batches_keep_the_mlp_whole_where_it_fits_and_slice_it_where_not(tmp_path):
    """train.tiled_mlp=auto slices the MLP past select.TILE_TOKENS tokens a forward, at one more MLP forward a
    step: an auto split whose micro-batch (of at most split.WHOLE_TOKENS) fits unsliced leaves it whole (the plan's
    kernels say so, its peak is the unsliced one); where only the sliced one fits, the slices stay on."""
    from dataclasses import replace

    from transformers import LlamaConfig

    from slimtune.engine import run_plan
    from slimtune.kernels import select

    # a wide MLP over a small vocabulary: the backward of a layer's MLP sets the peak (the estimate reads only
    # config.json, on the meta device)
    LlamaConfig(hidden_size=256, intermediate_size=4096, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, vocab_size=512).save_pretrained(tmp_path)
    cfg = _cfg(tmp_path, batch_size=16)
    cfg.method.dropout = 0.0  # fused LoRA: the fast engine, whose estimate models the slices
    if not split.memory.fast_engine(cfg):
        pytest.skip("this config is not on the fast engine")
    cfg.data.max_len = 4096
    sizes = [(4096, 4000)] * 16  # one micro-batch of 65,536 tokens, past TILE_TOKENS
    roomy = run_plan.for_estimate(cfg, 80 * GIB, sizes)
    assert roomy.micro_batch_size == 16 and roomy.split.whole_mlp and roomy.kernels.tiled_mlp == 0
    assert "the MLP unsliced (it fits whole)" in roomy.split.why and "tiled MLP" not in roomy.describe()
    option = roomy.split.chosen
    sliced = split._estimated(cfg, option, sizes, 1, None, replace(roomy.kernels, tiled_mlp=1))
    assert option.peak - sliced.peak > 2**20  # one layer's intermediates for every token, not for one slice
    tight = run_plan.for_estimate(cfg, (sliced.peak + option.peak) / 2 / (1 - split.MARGIN), sizes)
    assert (tight.micro_batch_size, tight.split.whole_mlp, tight.kernels.tiled_mlp) == (16, False, 1)
    assert tight.split.chosen.peak == sliced.peak and "tiled MLP" in tight.describe()
    short = run_plan.for_estimate(cfg, 80 * GIB, [(1024, 1000)] * 16)  # 16,384 tokens: never sliced
    assert not short.split.whole_mlp and short.kernels.tiled_mlp == 1
    cfg.data.max_len = 8192  # 131,072 tokens a micro-batch: past WHOLE_TOKENS, sliced however much memory is free
    longer = run_plan.for_estimate(cfg, 1024 * GIB, [(8192, 8000)] * 16)
    assert 16 * 8192 > split.WHOLE_TOKENS and not longer.split.whole_mlp and longer.kernels.tiled_mlp == 1
    cfg.data.max_len = 4096
    cfg.train.tiled_mlp = "on"  # the user's switch stays
    assert run_plan.for_estimate(cfg, 80 * GIB, sizes).kernels.tiled_mlp == 1
    assert select.TILE_TOKENS < 16 * 4096


def test_a_plan_that_keeps_the_mlp_whole_prints_no_fallback_for_it(tiny_model_dir):
    """select.enable with the plan's record (tiled_mlp 0: the MLP left whole) says nothing about the tiled MLP;
    a record that wants it and a model that took none would."""
    from dataclasses import replace

    from transformers import AutoModelForCausalLM

    from slimtune.kernels import select

    tiny_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tc = config.TrainConfig()
    asked = select.choose(tc, "cuda", 0)
    assert asked.tiled_mlp == 1
    none = select.Kernels()
    said = select.fallbacks(tiny_model, tc, "cuda", none, replace(asked, tiled_mlp=0))
    assert not [line for line in said if line.startswith("train.tiled_mlp")]
    said = select.fallbacks(tiny_model, tc, "cuda", none, asked)
    assert [line for line in said if line.startswith("train.tiled_mlp=auto")]
