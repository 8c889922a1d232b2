"""Compiled decoder layers (kernels/compiled.py) on the CPU, through the whole loop: the same per-step losses as
the eager layers, one graph for every layer and every batch length, evaluation and generation left eager, a
compile that fails falling back with one printed line, and the layers' own forwards given back after the run.
The CPU tests compile with the aot_eager backend (dynamo + AOT autograd, the graphs inductor would get,
without generating C++); tests/kernels/test_compiled_gpu.py runs inductor on a GPU."""
from __future__ import annotations

import pytest
import torch

from conftest import lora_run_config, make_model
from slimtune import config, load_config, methods
from slimtune import train as train_mod
from slimtune.runs.metrics_log import read_metrics
from slimtune.kernels import compiled, lora, select, tiled_mlp

STEPS = 3
# padded batches (packing off: the CPU's packed attention loops over records in Python, which dynamo would
# unroll per record count), chunked loss and fused LoRA: the layers' graph holds LoRA's autograd node
TRAIN = dict(packing="off", loss="chunked", fused_lora="on", tiled_mlp="off")


@pytest.fixture(autouse=True)
def _aot_eager(monkeypatch):
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _train(tmp, model_dir, name: str, **train):
    path = lora_run_config(tmp, model_dir, name, method={"dropout": 0.0, "target_modules": ["all-linear"]},
                           max_steps=STEPS, micro_batch_size=2, grad_accum=2, eval_at_start=False, **TRAIN, **train)
    lines: list[str] = []
    result = train_mod.from_config(load_config(path), show_progress=False, log=lambda *a, **k: lines.append(" ".join(
        map(str, a))))
    losses = [r["loss"] for r in read_metrics(tmp / name / "metrics.jsonl") if "loss" in r]
    return result, losses, lines


def test_compiled_layers_train_as_the_eager_ones_with_one_graph(tmp_path, tiny_model_dir):
    from torch._dynamo.utils import counters

    _, eager, _ = _train(tmp_path, tiny_model_dir, "eager", compile="off")
    counters.clear()
    result, got, lines = _train(tmp_path, tiny_model_dir, "compiled", compile="on")
    assert len(eager) == len(got) == STEPS
    # the same ops in the same order (aot_eager runs the traced graph op by op): exact up to fp32 reassociation
    assert max(abs(a - b) for a, b in zip(eager, got)) < 1e-6, (eager, got)
    assert eager[-1] < eager[0]  # it trains
    assert result["compiled_layers"] == 2 and result["fused_lora_layers"] == 14
    # one graph whatever the layer and the padded length (records differ in length: 6 micro-batches), and a new
    # one only where the inputs differ in kind: the first layer's input needs no grad (frozen embeddings) and
    # the others' do; a micro-batch with padding brings a mask, one without none. So at most 2 x 2 graphs here;
    # a graph per layer or per length (a minute each on a GPU) would make more.
    assert 1 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    assert any(line.startswith("compile: 2 decoder layers") for line in lines), lines
    assert not [line for line in lines if line.startswith("fast path off")]


def _lora_model(vocab: int = 64):
    model = make_model(vocab)
    return methods.apply(model, config.MethodConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))


def test_forwards_without_grad_stay_eager_and_disable_gives_the_forward_back():
    from torch._dynamo.utils import counters

    model = _lora_model()
    assert compiled.enable(model, log=lambda *_: None) == len(compiled.layers(model)) > 0
    ids = torch.randint(0, 64, (2, 9))
    counters.clear()
    with torch.no_grad():  # evaluation, generation: never a new graph
        want = model(input_ids=ids).logits
        model.generate(input_ids=ids[:, :4], max_new_tokens=3, do_sample=False)
    assert counters["stats"]["calls_captured"] == 0, dict(counters["stats"])
    got = model(input_ids=ids).logits  # training forward: compiled
    assert counters["stats"]["calls_captured"] >= 1
    torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-5)
    compiled.disable(model)
    assert compiled.enabled(model) == 0
    assert all("forward" not in layer.__dict__ for layer in compiled.layers(model))


def test_a_compile_that_fails_falls_back_to_eager_with_one_line(monkeypatch):
    def broken(gm, example_inputs):
        raise RuntimeError("no lowering for this op")

    monkeypatch.setattr(compiled, "BACKEND", broken)
    model, lines = _lora_model(), []
    compiled.enable(model, log=lines.append)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for _ in range(2):
        got = model(input_ids=ids).logits
        torch.testing.assert_close(got.detach(), want)
    failed = [line for line in lines if "torch.compile failed" in line]
    assert len(failed) == 1 and "no lowering for this op" in failed[0], lines


@pytest.mark.parametrize("mode, device, triton, want", [
    ("auto", "cpu", True, False), ("auto", "cuda", True, True), ("auto", "cuda", False, False),
    ("on", "cpu", False, True), ("off", "cuda", True, False)])
def test_auto_compiles_on_cuda_with_triton_only(monkeypatch, mode, device, triton, want):
    monkeypatch.setattr(compiled, "available", lambda: triton)
    assert select.use_compile(mode, device) is want


def test_one_graph_for_every_layer_with_fused_lora_and_tiled_mlp_bound_inside():
    """Four layers, each with fused LoRA layers and a tiled MLP bound into it (kernels/lora.py, tiled_mlp.py) and
    three lengths without a mask: two graphs, the first layer's (its input needs no grad) and the others'. The
    bound forwards are methods, not functools.partials: dynamo guards on a partial's identity, and a partial per
    layer recompiled the layer once per layer on an H200 (2026-12-03, 8 graphs, then the recompile limit)."""
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2))
    model = methods.apply(model, config.MethodConfig(r=4, dropout=0.0, target_modules=["all-linear"]))
    took = select.enable(model, config.TrainConfig(packing="off", fused_lora="on", tiled_mlp="on", compile="on"),
                         "cpu", log=lambda *_: None)
    try:
        assert (took.compiled_layers, took.fused_lora_layers, took.tiled_mlp) == (4, 28, 4)
        counters.clear()
        for length in (9, 13, 21):
            ids = torch.randint(0, 64, (1, length))
            model(input_ids=ids, use_cache=False).logits.float().sum().backward()
        assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])
    finally:
        select.disable(model)
    assert not any(hasattr(m, a) for m in model.modules() for a in (lora.NAME, tiled_mlp.MIN))


def test_auto_leaves_the_layers_eager_beside_liger_and_says_so(monkeypatch):
    """auto: not beside Liger's norm/MLP kernels (dynamo failed on them inside checkpointed 8B layers); on: tried."""
    from slimtune.kernels import norm_mlp

    monkeypatch.setattr(compiled, "available", lambda: True)
    assert select.use_compile("auto", "cuda", beside_liger=0) and not select.use_compile("auto", "cuda", 97)
    assert select.use_compile("on", "cuda", beside_liger=97)
    monkeypatch.setattr(norm_mlp, "enable", lambda model: 5)  # stands for Liger on a GPU
    monkeypatch.setattr(select, "use_fused_norm_mlp", lambda *a: True)
    monkeypatch.setattr(select, "chosen", lambda *a: True)  # the run plan's Liger choice for this width
    model, lines = _lora_model(), []
    took = select.enable(model, config.TrainConfig(packing="off", fused_lora="off", fused_rope="off", tiled_mlp="off"),
                         "cuda", log=lines.append)
    select.disable(model)
    assert took.compiled_layers == 0 and took.fused_norm_mlp == 5
    assert [line for line in lines if "train.compile" in line] == [
        "fast path off: train.compile=auto: layers left eager beside Liger's norm/MLP kernels (dynamo failed on them "
        "inside checkpointed layers; set train.compile=on to try, or fused_norm_mlp=off)"]


def test_layers_with_lora_on_fused_experts_stay_eager_with_the_reason():
    """peft's ParamWrapper registers a parametrization each forward: dynamo would break the graph at each one."""
    import warnings

    from transformers import AutoConfig, AutoModelForCausalLM

    mcfg = AutoConfig.for_model("qwen3_moe", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4,
                                num_experts_per_tok=2, moe_intermediate_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = methods.apply(AutoModelForCausalLM.from_config(mcfg), config.MethodConfig(r=2, dropout=0.0))
    assert compiled.parametrized(model) and compiled.enable(model, log=lambda _: None) == 0
    lines: list[str] = []
    took = select.enable(model, config.TrainConfig(compile="on", packing="off", fused_lora="off"), "cpu", lines.append)
    assert took.compiled_layers == 0 and not compiled.enabled(model)
    assert "fast path off: train.compile=on: layers left eager: peft's LoRA on fused expert weights registers a " \
           "parametrization at each forward, which torch.compile cannot trace" in lines
    select.disable(model)
