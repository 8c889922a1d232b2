"""LoRA on fused expert weights computed per expert (kernels/expert_lora.py) against peft's ParamWrapper, which
forms W + s B A for every expert: tiny random Qwen3-MoE and Mixtral (2 layers, hidden 64, 8 experts, top-2, fp32)
on 5 tokens, so several experts get rows and some none; the loop and grouped_mm (CPU kernel, aligned widths)
give peft's loss and every LoRA gradient, over 16-bit and NF4 (quant_experts.Nf4Stack) bases; enable/disable
swap the forward and back; 3 steps of slimtune.fit give the same losses with the fast path and without."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch

import slimtune
from slimtune import config, methods
from slimtune.data.encode import Encoded
from slimtune.kernels import expert_lora, select
from slimtune.runs.metrics_log import read_metrics

ROUTED = {"qwen3_moe": dict(num_experts=8, moe_intermediate_size=32), "mixtral": dict(num_local_experts=8)}


def tiny(arch: str = "qwen3_moe") -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        arch, vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts_per_tok=2, initializer_range=0.2, **ROUTED.get(arch, {})))


def adapted(model: torch.nn.Module, name: str = "lora") -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = methods.apply(model, config.MethodConfig(name=name, r=4, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # B starts at zero, which would hide the adapter's output and A's gradient
    return model


def step(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within 1e-5 of the reference's largest entry: fp32 sums in another order (measured up to ~3e-6)."""
    return float((a - b).abs().max()) <= 1e-5 * float(b.abs().max().clamp_min(1e-30))


def routed_experts(model: torch.nn.Module) -> list[set[int]]:
    """Each MoE layer's experts that got tokens in the next forward (filled by a pre-hook)."""
    seen: list[set[int]] = []
    for block in [m for m in model.modules() if type(m).__name__.endswith("SparseMoeBlock")]:
        block.gate.register_forward_hook(lambda mod, args, out: seen.append(set(out[2].flatten().tolist())))
    return seen


@pytest.fixture
def loop_mode(request: pytest.FixtureRequest):
    expert_lora.MODE = request.param
    yield request.param
    expert_lora.MODE = "auto"


@pytest.mark.parametrize("arch", list(ROUTED))
@pytest.mark.parametrize("loop_mode", ["loop", "grouped"], indirect=True)
def test_the_per_expert_path_gives_peft_outputs_and_lora_gradients(arch, loop_mode):
    model = adapted(tiny(arch))
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))  # 10 pairs over 8 experts
    seen = routed_experts(model)
    logits, grads = step(model, ids)
    assert all(1 < len(s) < 8 for s in seen), seen  # several experts with rows, some without
    assert expert_lora.enable(model) == 2
    fast_logits, fast = step(model, ids)
    assert close(fast_logits, logits)
    assert sorted(fast) == sorted(grads) and len(grads) == 2 * (2 * 2 + 2 * 2)  # q, v, gate_up, down: A and B
    bad = [n for n in grads if not close(fast[n], grads[n])]
    assert not bad, bad
    for layer, experts_hit in enumerate(seen[:2]):
        b = fast[f"base_model.model.model.layers.{layer}.mlp.experts.lora_B.default.weight"].view(64, 4, 8)
        idle = sorted(set(range(8)) - experts_hit)
        assert float(b[:, :, idle].abs().max()) == 0.0 and float(b[:, :, sorted(experts_hit)].abs().min(0)[0].max()) > 0


@pytest.mark.parametrize("loop_mode", ["loop", "grouped"], indirect=True)
def test_an_nf4_expert_stack_gives_peft_outputs_and_gradients(loop_mode):
    pytest.importorskip("bitsandbytes")
    from slimtune.methods import quant_experts

    base = tiny()
    quant_experts.quantize_experts(base)
    model = adapted(base, "qlora")
    stack = model.get_parameter("base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.gate_up_proj")
    assert quant_experts.is_nf4(stack)
    ids = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(2))
    logits, grads = step(model, ids)
    assert expert_lora.enable(model) == 2
    fast_logits, fast = step(model, ids)
    assert close(fast_logits, logits)
    bad = [n for n in grads if not close(fast[n], grads[n])]
    assert not bad, bad
    assert quant_experts.is_nf4(stack) and stack.grad is None


def test_enable_and_disable_swap_the_forward_and_back():
    from peft.tuners.lora.layer import ParamWrapper

    model = adapted(tiny())
    outer = [m.mlp.experts for m in model.base_model.model.model.layers]
    ids = torch.randint(0, 128, (1, 7))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert expert_lora.enable(model) == 2 and expert_lora.enabled(model) == 2
        assert all("forward" in m.__dict__ for m in outer)
        with model.disable_adapter():  # adapters off: peft's forward, the base model's output
            plain = model(input_ids=ids).logits
        expert_lora.disable(model)
        assert expert_lora.enabled(model) == 0
        assert all("forward" not in m.__dict__ and m.forward.__func__ is ParamWrapper.forward for m in outer)
        assert torch.equal(model(input_ids=ids).logits, before)
        with model.disable_adapter():
            assert torch.equal(model(input_ids=ids).logits, plain) and not torch.equal(plain, before)


def test_experts_laid_out_otherwise_keep_peft_forward_with_one_line():
    lines: list[str] = []
    model = adapted(tiny_gpt_oss())
    assert expert_lora.enable(model, lines.append) == 0
    assert lines == ["fast path off: fused expert LoRA: 2 of 2 experts modules stay peft's: a GptOssExperts laid out "
                     "otherwise than [experts, out, in] with gate and up concatenated, no biases"]


def tiny_gpt_oss() -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}))


def test_three_fit_steps_give_the_same_losses_with_the_fast_path(tmp_path):
    gen = torch.Generator().manual_seed(3)
    records = [Encoded(input_ids=ids, labels=ids) for ids in torch.randint(0, 128, (6, 9), generator=gen).tolist()]
    runs = {}
    for mode in ("on", "off"):
        cfg = slimtune.load_config(overrides=[
            "method.r=4", "method.dropout=0", "train.max_steps=3", "train.batch_size=2", "train.precision=fp32",
            "train.save_every=0", "train.eval_at_start=false", f"train.fused_lora={mode}",
            f"train.output_dir={tmp_path / mode}"])
        lines: list[str] = []
        model = adapted(tiny())
        runs[mode] = (slimtune.fit(copy.deepcopy(model), records, cfg, device="cpu", log=lines.append), lines)
    (on, said), (off, _) = runs["on"], runs["off"]
    assert on["fused_expert_layers"] == 2 and off["fused_expert_layers"] == 0
    assert any("fast paths: fused LoRA layers, fused expert LoRA" in line for line in said), said
    losses = {m: [r["loss"] for r in read_metrics(tmp_path / m / "metrics.jsonl") if "loss" in r] for m in runs}
    assert len(losses["on"]) == 3 and losses["on"] == pytest.approx(losses["off"], rel=1e-5)
    assert losses["on"][2] != losses["on"][0]
    assert select.choose(config.load(None, ["train.fused_lora=on"]).train, "cpu", 64, moe=True).fused_expert_layers


def test_select_takes_fused_experts_and_keeps_their_layers_eager_with_the_reason(monkeypatch):
    """The per-expert path registers no parametrization, but inductor's code for its grouped matmuls failed on an
    H200: train.compile leaves such layers eager and says why once."""
    from slimtune.kernels import compiled

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    model = adapted(tiny())
    lines: list[str] = []
    took = select.enable(model, config.TrainConfig(compile="on", packing="off", fused_lora="on"), "cpu", lines.append)
    assert (took.fused_lora_layers, took.fused_expert_layers, took.compiled_layers) == (4, 2, 0), lines
    assert not compiled.parametrized(model) and compiled.grouped_experts(model) and not compiled.enabled(model)
    assert [line for line in lines if "fast path off" in line] == [
        "fast path off: train.compile=on: layers left eager around the per-expert LoRA path: inductor's code for its "
        "grouped matmuls failed on an H200 (torch 2.11: invalid strides); eager it is peft's within 1e-5"]
    select.disable(model)
    assert expert_lora.enabled(model) == 0 and compiled.parametrized(model) and not compiled.grouped_experts(model)


def test_the_grouped_path_traces_in_one_graph_with_eager_gradients(monkeypatch):
    """torch.compile(fullgraph=True) through aot_eager (the graphs inductor would get) on the grouped_mm path,
    bf16 (grouped_mm's only dtype under dynamo; r=8 keeps A's rows 16-byte aligned): eager's output and gradients."""
    monkeypatch.setattr(expert_lora, "MODE", "grouped")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = methods.apply(tiny().to(torch.bfloat16), config.MethodConfig(r=8, dropout=0.0))
    experts = model.base_model.model.model.layers[0].mlp.experts
    params = [p for n, p in experts.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.1)
    assert expert_lora.enable(model) == 2
    gen = torch.Generator().manual_seed(4)
    x, grad = torch.randn(7, 64, generator=gen).bfloat16(), torch.randn(7, 64, generator=gen).bfloat16()
    index, weights = torch.randint(0, 8, (7, 2), generator=gen), torch.rand(7, 2, generator=gen).bfloat16()

    def run(forward: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
        rows = x.clone().requires_grad_()
        y = forward(rows, index, weights)
        return [y.detach(), *torch.autograd.grad(y, [rows, *params], grad)]
    eager = run(experts.forward)
    traced = run(torch.compile(experts.forward, backend="aot_eager", fullgraph=True))
    assert all(torch.equal(a, b) for a, b in zip(traced, eager))  # the same ops, run one by one


def test_the_per_expert_path_is_taken_on_cuda_by_default_and_anywhere_with_on():
    """auto takes the per-expert path for fused experts on a GPU (measured there: 1.34x peft's path at 30B) and
    keeps peft's on the CPU, where the per-expert loop has nothing to gain; on takes it anywhere, off nowhere."""
    from slimtune.config import TrainConfig
    from slimtune.kernels import select

    for mode, device, want in (("auto", "cuda", 1), ("auto", "cpu", 0), ("on", "cpu", 1), ("on", "cuda", 1),
                               ("off", "cuda", 0)):
        assert select.choose(TrainConfig(fused_lora=mode), device, 64, moe=True).fused_expert_layers == want, mode
    assert select.choose(TrainConfig(fused_lora="on"), "cuda", 64, moe=False).fused_expert_layers == 0
