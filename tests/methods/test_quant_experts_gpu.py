"""NF4 expert stacks (methods/quant_experts.py) on a CUDA GPU, with bitsandbytes' CUDA kernels: a tiny random
Qwen3-MoE in bf16 gives the loss of its dequantized experts under the same LoRA, and a packed stack holds
NF4_BYTES a weight on the device. The CPU twin is tests/methods/test_quant_experts.py."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from slimtune import config, methods
from slimtune.engine import moe_memory
from slimtune.methods import experts, quant_experts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' CUDA NF4 kernels need a CUDA "
                                "GPU; tests/methods/test_quant_experts.py covers the same path on the CPU")


def _apply(model: torch.nn.Module, name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return methods.apply(model, config.MethodConfig(name=name, r=4, dropout=0.0))


def test_bf16_nf4_experts_give_the_loss_of_their_dequantized_weights_on_the_gpu():
    pytest.importorskip("bitsandbytes")
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    mcfg = AutoConfig.for_model("qwen3_moe", vocab_size=128, hidden_size=128, intermediate_size=256,
                                moe_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2)
    base = AutoModelForCausalLM.from_config(mcfg).to("cuda", torch.bfloat16)
    quantized = copy.deepcopy(base)
    quant_experts.quantize_experts(quantized)
    for name in experts.fused(base):
        owner, _, leaf = name.rpartition(".")
        dense = quantized.get_parameter(name).dequantize()
        base.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(dense, requires_grad=False)
    ours, theirs = _apply(quantized, "qlora"), _apply(base, "lora")
    for n, p in ours.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    theirs.load_state_dict(ours.state_dict(), strict=False)
    x = torch.randint(0, 128, (2, 32), device="cuda")
    a, b = ours(input_ids=x, labels=x).loss, theirs(input_ids=x, labels=x).loss
    assert abs(a.item() - b.item()) < 1e-3, (a.item(), b.item())  # the same bf16 weights through the same ops
    a.backward()
    grads = [p.grad for n, p in ours.named_parameters() if "experts" in n and "lora_B" in n]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_packed_stack_holds_nf4_bytes_a_weight_on_the_gpu():
    pytest.importorskip("bitsandbytes")
    w = torch.randn(16, 1536, 2048, device="cuda", dtype=torch.bfloat16)  # 16 of Qwen3-30B-A3B's gate_up
    before = torch.cuda.memory_allocated()
    stack = quant_experts.quantize(w)
    held = torch.cuda.memory_allocated() - before
    assert stack.nbytes_stored == w.numel() * moe_memory.NF4_BYTES
    assert held == pytest.approx(stack.nbytes_stored, rel=0.01)  # allocator rounding of the few small tensors
    assert torch.equal(stack[5], stack.dequantize()[5])
