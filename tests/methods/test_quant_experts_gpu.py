"""NF4 expert stacks (methods/quant_experts.py) on a CUDA GPU, with bitsandbytes' CUDA kernels: a tiny random
Qwen3-MoE in bf16 gives the loss of its dequantized experts under the same LoRA, a packed stack holds
NF4_BYTES a weight on the device, and qlora's load (methods/quant.load_base) brings one 16-bit stack at a time to
the GPU. The CPU twins are tests/methods/test_quant_experts.py and test_quant_load.py."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

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


def _moe_folder(tmp_path: Path) -> Path:
    """A saved random Qwen3-MoE whose 16-bit experts (8 layers x 32 experts: 192 MiB in bf16, 16 MiB the largest
    stack) dwarf the rest."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from conftest import make_tokenizer

    torch.manual_seed(0)
    tok = make_tokenizer()
    mcfg = AutoConfig.for_model("qwen3_moe", vocab_size=len(tok), hidden_size=512, intermediate_size=1024,
                                moe_intermediate_size=256, num_hidden_layers=8, num_attention_heads=8,
                                num_key_value_heads=4, head_dim=64, num_experts=32, num_experts_per_tok=4)
    AutoModelForCausalLM.from_config(mcfg).to(torch.bfloat16).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


def _peak_load(load: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, int, int]:
    """(model, peak bytes allocated on the GPU while `load` ran, bytes it holds after), both above the start."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    model = load()
    torch.cuda.synchronize()
    return model, torch.cuda.max_memory_allocated() - start, torch.cuda.memory_allocated() - start


def test_qlora_load_of_fused_experts_brings_one_16_bit_stack_at_a_time_to_the_gpu(tmp_path):
    """quant.load_base (train's and load_run's load for qlora) onto the GPU: its peak is the 4-bit model plus one
    16-bit expert stack, where loading onto the GPU and packing there (transformers' device_map {"": "cuda"})
    first holds every 16-bit expert. Both give the same model (the Linear layers' NF4 codes, quantized on the
    CPU instead of the GPU, and the loss), and no accelerate hook is left."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from slimtune import models
    from slimtune.methods import quant

    folder = str(_moe_folder(tmp_path))
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16)  # methods/quant.quantization_config's
    ours, peak, held = _peak_load(lambda: quant.load_base(folder, "bf16", False, "cuda", bnb)[0])
    names = experts.fused(ours)
    stacks16 = [ours.get_parameter(n).numel() * 2 for n in names]
    assert len(names) == 16 and all(quant_experts.is_nf4(ours.get_parameter(n)) for n in names)
    assert {p.device.type for p in ours.parameters()} == {"cuda"}
    assert not [n for n, m in ours.named_modules() if hasattr(m, "_hf_hook")]

    def old() -> torch.nn.Module:
        model = models.load(folder, "bf16", device="cuda", quantization=bnb)[0]
        quant_experts.quantize_experts(model)
        return model
    theirs, old_peak, old_held = _peak_load(old)
    print(f"16-bit experts {sum(stacks16) / 2**20:.1f} MiB (largest stack {max(stacks16) / 2**20:.1f}); load peak "
          f"{peak / 2**20:.1f} MiB, held {held / 2**20:.1f}; loaded on the GPU then packed: peak "
          f"{old_peak / 2**20:.1f}, held {old_held / 2**20:.1f}")
    assert old_peak >= sum(stacks16)  # the path this replaces: every 16-bit expert on the GPU at once
    assert peak <= held + 2 * max(stacks16) + 2**20  # one stack's 16-bit copy and its packing's scratch at a time
    assert peak < 0.6 * sum(stacks16)  # about 0.35: a quarter for the 4-bit experts, a twelfth for one stack
    x = torch.randint(0, 128, (2, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        a, b = ours(input_ids=x, labels=x).loss.item(), theirs(input_ids=x, labels=x).loss.item()
    assert abs(a - b) < 1e-3 * abs(b), (a, b)  # bf16 matmuls over the same 4-bit codes
    codes = [(m.weight, theirs.get_submodule(n).weight) for n, m in ours.named_modules()
             if type(m).__name__ == "Linear4bit"]
    assert len(codes) == 32  # q, k, v, o of 8 layers
    same = sum(torch.sum(p == q).item() for p, q in codes) / sum(p.numel() for p, _ in codes)
    assert same > 0.999, same  # bitsandbytes' CPU and CUDA NF4 share their bounds; a tie may round apart
