"""Compiled decoder layers (kernels/compiled.py) with inductor on a GPU, under everything a default GPU run
turns on (packed varlen attention, chunked loss, fused LoRA, Liger's RoPE where installed, checkpointing,
activation offload): the loss and LoRA gradients of the eager layers, at most two graphs (the first layer's
input needs no grad, the others' do) whatever the row length, and no higher peak."""
from __future__ import annotations

import pytest
import torch

from slimtune import config, methods
from slimtune.data import pack
from slimtune.data.encode import IGNORE, Encoded
from slimtune.engine.loss import token_loss_sum
from slimtune.engine.offload import OffloadActivations
from slimtune.kernels import compiled, select

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and compiled.available()),
                                reason="inductor's GPU code needs CUDA and Triton; CPU checks: test_compiled.py")


def _batch(n: int, length: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        ids = torch.randint(0, 1000, (length + 37 * i,), generator=g).tolist()
        records.append(Encoded(ids, [IGNORE] * 20 + ids[20:]))
    return {k: v.cuda() if torch.is_tensor(v) else v for k, v in pack.collate(records).items()}


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def test_compiled_layers_give_the_eager_loss_and_gradients_with_two_graphs_at_most():
    from torch._dynamo.utils import counters
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=1000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=2, initializer_range=0.05)
    model = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = methods.apply(model, config.MethodConfig(r=8, alpha=16, dropout=0.0, target_modules=["all-linear"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.train()
    batches = [_batch(4, 300, seed) for seed in range(3)]  # three row lengths

    def run(mode: str):
        took = select.enable(model, config.TrainConfig(compile=mode), "cuda")
        out = []
        hooks = OffloadActivations(model)
        for b in batches:
            model.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with torch.autocast("cuda", dtype=torch.bfloat16), hooks:
                s, _ = token_loss_sum(model, b, took.chunked_loss)
            s.backward()
            torch.cuda.synchronize()
            grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
            out.append((float(s), grads, torch.cuda.max_memory_allocated()))
        select.disable(model)
        return took, out

    _, eager = run("off")
    torch._dynamo.reset()
    counters.clear()
    took, comp = run("on")
    assert took.compiled_layers == 4 and took.fused_lora_layers == 28 and took.packing == "rows"
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    for (want, wg, wpeak), (got, gg, gpeak) in zip(eager, comp):
        assert abs(got - want) < 1e-2 * abs(want)
        for name in wg:
            assert _rel(gg[name], wg[name]) < 5e-2, name  # bf16: inductor fuses and reorders the elementwise math
        print(f"peak eager {wpeak / 2**20:.1f} MiB, compiled {gpeak / 2**20:.1f} MiB")
        assert gpeak <= 1.1 * wpeak + 2**20
