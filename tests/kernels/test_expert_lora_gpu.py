"""LoRA on fused expert weights per expert (kernels/expert_lora.py) on a GPU, through torch._grouped_mm in bf16:
the grouped matmuls against the per-expert loop at odd row counts with empty experts, and a Qwen3-MoE experts
module of a mid-size shape (64 experts, hidden 1024, width 768, 512 tokens, top-8; 16-bit and NF4 stacks) against
peft's ParamWrapper under bf16 autocast with fp32 adapters, as a run trains: output and every LoRA gradient, and
the time of a forward + backward of each path (printed; run with -s to see it)."""
from __future__ import annotations

import time
import warnings

import pytest
import torch

from slimtune.kernels import expert_lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._grouped_mm in bf16 needs CUDA; CPU "
                                "checks of the per-expert path: test_expert_lora.py")
# bf16 (eps 7.8e-3): peft rounds W + s B A to bf16 and reduces its [E, out, in] gradient in bf16 matmuls; the
# per-expert path sums other products in another order. Relative error of the whole tensor (norm), not per entry.
TOL = 2e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm().clamp_min(1e-30))


def test_grouped_mm_matches_the_loop_with_empty_experts():
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = [5, 0, 37, 1, 0, 90, 3, 0]  # odd rows, experts without any
    ids = torch.repeat_interleave(torch.arange(8, device="cuda"), torch.tensor(counts, device="cuda"))
    top = ids[torch.randperm(ids.numel(), device="cuda", generator=g)].view(-1, 1)
    w = (torch.randn(8, 96, 64, device="cuda", generator=g) * 0.05).bfloat16()
    a = (torch.randn(8, 16, 64, device="cuda", generator=g) * 0.05).requires_grad_()
    b = (torch.randn(8, 96, 16, device="cuda", generator=g) * 0.05).requires_grad_()
    x = torch.randn(top.shape[0], 64, device="cuda", generator=g).bfloat16().requires_grad_()
    grad = torch.randn(top.shape[0], 96, device="cuda", generator=g).bfloat16()
    outs = {}
    for grouped in (True, False):
        order, tokens, groups = expert_lora.route(top, 8, grouped)
        y = expert_lora.expert_linear(x[tokens], w, (a, b, 2.0), groups)
        outs[grouped] = [y, *torch.autograd.grad(y, [x, a, b], grad[tokens])]
    for name, got, want in zip(("y", "x", "A", "B"), outs[True], outs[False]):
        assert _rel(got, want) < 1e-2, name
    assert float(outs[True][2][[1, 4, 7]].abs().max()) == 0.0  # no rows: no gradient, not uninitialized memory


def _experts(nf4: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the peft model, its experts' outermost ParamWrapper): one Qwen3-MoE layer of the mid-size shape."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from slimtune import config, methods
    from slimtune.methods import quant_experts

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen3_moe", vocab_size=256, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=4, head_dim=128, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=768, initializer_range=0.02), dtype=torch.bfloat16).cuda()
    if nf4:
        pytest.importorskip("bitsandbytes")
        quant_experts.quantize_experts(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = methods.apply(model, config.MethodConfig(name="qlora" if nf4 else "lora", r=16, dropout=0.0))
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()  # fp32 adapters over a bf16 base, as precision=bf16 trains
                if "lora_B" in n:
                    p.normal_(std=0.02)
    return model, model.base_model.model.model.layers[0].mlp.experts


def _run(experts: torch.nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
         grad: torch.Tensor) -> tuple[list[torch.Tensor], float]:
    params = [p for n, p in experts.named_parameters() if "lora_" in n]
    for _ in range(2):  # warm-up, then timed
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = experts(x, index, weights)
        grads = torch.autograd.grad(y, params, grad)
        torch.cuda.synchronize()
    return [y, *grads], time.perf_counter() - start


@pytest.mark.parametrize("nf4", [False, True])
def test_grouped_path_gives_peft_output_and_gradients_and_its_time(nf4):
    model, experts = _experts(nf4)
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(512, 1024, device="cuda", generator=g).bfloat16()
    index = torch.rand(512, 64, device="cuda", generator=g).topk(8, dim=-1).indices
    weights = torch.softmax(torch.randn(512, 8, device="cuda", generator=g), -1).bfloat16()
    grad = torch.randn(512, 1024, device="cuda", generator=g).bfloat16()
    want, peft_s = _run(experts, x, index, weights, grad)
    assert expert_lora.enable(model) == 1 and expert_lora._grouped(x.device, torch.bfloat16, [1024, 768, 16])
    got, ours_s = _run(experts, x, index, weights, grad)
    for i, (a, b) in enumerate(zip(got, want)):
        assert _rel(a, b) < TOL, (i, _rel(a, b))
    print(f"\nexperts 64 x (1024 -> 2 x 768 -> 1024), 512 tokens top-8, LoRA r16, {'NF4' if nf4 else 'bf16'} base, "
          f"forward + backward: peft {peft_s * 1e3:.1f} ms, grouped {ours_s * 1e3:.1f} ms")


def test_a_default_gpu_run_takes_the_grouped_path_eager_with_peft_s_loss_and_gradients():
    """train.* at its defaults on CUDA (select.enable): the experts' LoRA through the grouped path and the layers
    eager (inductor's code for the grouped matmuls failed here with "Invalid strides/sizes" on an H200, torch
    2.11), with peft's loss and LoRA gradients."""
    from slimtune.config import TrainConfig
    from slimtune.kernels import select

    model, _ = _experts(nf4=False)
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    ids = torch.randint(0, 256, (1, 384), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))

    def run() -> list[torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        return [loss.detach(), *torch.autograd.grad(loss, list(params.values()))]
    peft = run()
    lines: list[str] = []
    took = select.enable(model, TrainConfig(packing="off"), "cuda", lines.append)
    try:
        assert took.fused_expert_layers == 1 and took.compiled_layers == 0, (took, lines)
        assert any("layers left eager around the per-expert LoRA path" in line for line in lines), lines
        got = run()
    finally:
        select.disable(model)
    for name, a, b in zip(["loss", *params], got, peft):
        assert _rel(a, b) < TOL and float(b.abs().max()) > 0, (name, _rel(a, b))
