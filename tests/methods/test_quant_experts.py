"""qlora of a mixture of experts whose experts are fused 3-D weights (methods/quant_experts.py), on the CPU with
bitsandbytes' CPU backend: a tiny random Qwen3-MoE (2 layers, hidden 64, 8 experts, top-2) with its experts in
NF4 gives the loss of the same model with those experts dequantized into ordinary weights and the same LoRA,
and the LoRA of every expert that received tokens gets a gradient (the others none)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

from slimtune import config, methods
from slimtune.methods import quant_experts

pytest.importorskip("bitsandbytes")


def tiny(arch: str = "qwen3_moe"):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    extra = dict(num_experts=8, moe_intermediate_size=64) if arch == "qwen3_moe" else dict(num_local_experts=8)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(
        arch, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_experts_per_tok=2, initializer_range=0.2, **extra))


def _apply(model: torch.nn.Module, name: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return methods.apply(model, config.MethodConfig(name=name, r=4, dropout=0.0))


def _pair(arch: str = "qwen3_moe") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(qlora model, lora model on the dequantized experts) with the same, non-zero LoRA weights."""
    base = tiny(arch)
    quantized = copy.deepcopy(base)
    quant_experts.quantize_experts(quantized)
    for name in quant_experts.experts.fused(base):
        owner, _, leaf = name.rpartition(".")
        dense = quantized.get_parameter(name).dequantize()
        base.get_submodule(owner)._parameters[leaf] = torch.nn.Parameter(dense, requires_grad=False)
    ours, theirs = _apply(quantized, "qlora"), _apply(base, "lora")
    torch.manual_seed(1)
    for n, p in ours.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # B starts at zero: a non-zero delta shows it is applied
    theirs.load_state_dict(ours.state_dict(), strict=False)
    return ours, theirs


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_nf4_experts_give_the_loss_of_their_dequantized_weights(arch):
    ours, theirs = _pair(arch)
    stack = ours.get_parameter("base_model.model.model.layers.0.mlp.experts.base_layer.base_layer.gate_up_proj")
    assert quant_experts.is_nf4(stack) and stack.shape == (8, 128 if arch == "qwen3_moe" else 256, 64)
    # 4 bits a weight + an 8-bit absmax per 64 + an fp32 scale per 256 absmax: what engine/memory.py counts
    assert stack.nbytes_stored == stack.numel() * (0.5 + 1 / 64 + 4 / (64 * 256))
    x = torch.randint(0, 128, (2, 24))
    a, b = ours(input_ids=x, labels=x).loss, theirs(input_ids=x, labels=x).loss
    # the same fp32 weights through the same ops: only the order of dequantize-then-add differs, so ~1e-7
    assert abs(a.item() - b.item()) < 1e-5, (a.item(), b.item())
    assert methods.count_parameters(ours) == methods.count_parameters(theirs)
    print("trainable, total:", methods.count_parameters(ours))


def test_every_expert_that_received_tokens_gets_a_lora_gradient():
    ours, _ = _pair()
    routed: dict[int, set[int]] = {}
    for i, layer in enumerate(ours.base_model.model.model.layers):
        def hook(module, args, i=i):
            routed[i] = set(args[1].flatten().tolist())  # (hidden, top_k_index, top_k_weights)
        layer.mlp.experts.register_forward_pre_hook(hook)
    x = torch.randint(0, 128, (1, 6))  # 6 tokens x top-2: some of the 8 experts get none
    ours(input_ids=x, labels=x).loss.backward()
    for i, layer in enumerate(ours.base_model.model.model.layers):
        wrapper = layer.mlp.experts  # down_proj's ParamWrapper; gate_up_proj's is its base_layer
        for w in (wrapper, wrapper.base_layer):
            grad = w.lora_B["default"].weight.grad  # [out, r x experts], expert e in columns j * 8 + e
            per_expert = grad.view(grad.shape[0], 4, 8).abs().sum(dim=(0, 1))
            assert {e for e in range(8) if per_expert[e] > 0} == routed[i], (i, w.parameter_name)
    assert 0 < len(routed[0]) < 8


def test_one_expert_read_by_index_dequantizes_its_own_blocks():
    w = torch.randn(5, 96, 64)
    stack = quant_experts.quantize(w)
    dense = stack.dequantize()
    assert torch.equal(stack[3], dense[3]) and torch.equal(stack[-1], dense[4])
    assert (dense - w).abs().max() < 0.2 * w.abs().max()  # NF4: 16 levels per block's absmax
    moved = stack.to(torch.bfloat16)
    assert quant_experts.is_nf4(moved) and moved.dtype == torch.bfloat16 and moved.packed is stack.packed


def test_a_stack_moved_by_module_to_reads_in_its_new_dtype_and_copies_whole():
    model = tiny()
    quant_experts.quantize_experts(model)
    model.to(torch.bfloat16)  # Module._apply assigns the moved stack to .data: the wrapper's dtype changes
    stack = model.get_parameter("model.layers.0.mlp.experts.down_proj")
    assert quant_experts.is_nf4(stack) and stack.dtype == torch.bfloat16
    assert stack.dequantize().dtype == stack[2].dtype == torch.bfloat16
    twin = copy.deepcopy(model).get_parameter("model.layers.0.mlp.experts.down_proj")
    assert quant_experts.is_nf4(twin) and isinstance(twin, torch.nn.Parameter) and twin.packed is not stack.packed
    assert torch.equal(twin.dequantize(), stack.dequantize())


def test_a_qlora_run_loads_for_use_with_its_experts_in_nf4_as_it_trained(monkeypatch, tmp_path):
    """trained.load_run: bitsandbytes' load (CUDA) stood in for by the tiny model; the adapter load by identity."""
    from slimtune import trained

    cfg = config.Config()
    cfg.method = config.MethodConfig(name="qlora", r=4, dropout=0.0)
    monkeypatch.setattr(trained, "read_config", lambda folder: cfg)
    monkeypatch.setattr(trained.trust, "decide", lambda *a, **k: False)
    monkeypatch.setattr(trained, "quantization_config", lambda *a: "4-bit")
    monkeypatch.setattr(trained.models, "load", lambda *a: (tiny(), None))
    monkeypatch.setattr(trained, "load_adapter", lambda base, folder: base)
    model, _, _ = trained.load_run(tmp_path)
    names = quant_experts.experts.fused(model)
    assert len(names) == 4 and all(quant_experts.is_nf4(model.get_parameter(n)) for n in names)
    monkeypatch.setattr(trained.models, "load", lambda *a: (tiny(), None))
    full, _, _ = trained.load_run(tmp_path, quantized=False)  # merge's full-precision base keeps them dense
    assert not any(quant_experts.is_nf4(full.get_parameter(n)) for n in names)
