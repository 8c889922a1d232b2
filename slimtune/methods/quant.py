"""QLoRA's base: weights quantized by bitsandbytes at load time (4-bit NF4 or 8-bit); CUDA only."""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

import torch

from .. import models
from . import experts, quant_experts
from .base import MethodError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

    from ..config import MethodConfig


def quantization_config(cfg: MethodConfig, compute: str = "auto") -> BitsAndBytesConfig | None:
    """The transformers quantization config for method qlora, or None for every other method. compute: the
    dtype the 4-bit matmuls run in, the run's half precision (auto: bf16 where the GPU has it, else fp16)."""
    if cfg.name != "qlora":
        return None
    if not torch.cuda.is_available():
        raise MethodError("method qlora quantizes the base weights with bitsandbytes, which needs a CUDA GPU; "
                          "on the CPU use method.name=lora (the same adapter on a full-precision base)")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MethodError("method qlora needs the bitsandbytes package: pip install bitsandbytes")
    from transformers import BitsAndBytesConfig

    if cfg.quant_bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    if compute == "auto":
        compute = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    dtype = torch.float16 if compute.startswith("fp16") else torch.bfloat16
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def prepare(model: torch.nn.Module, bits: int = 4) -> torch.nn.Module:
    """Freeze the quantized base, keeping its half-precision parts (embedding, head, norms) as they are, and
    pack a mixture of experts' fused expert weights into NF4 (methods/quant_experts.py: bitsandbytes leaves
    them in 16-bit).

    peft's prepare_model_for_kbit_training also casts every bf16/fp16 parameter to fp32: on a 1B Llama
    with a 128k vocabulary that is the tied embedding/head, +0.53 GiB (more than the 4-bit body) and an
    fp32 head matmul (bench/methods_memory.py, 2026-11-23). The adapters stay fp32 (peft keeps them so),
    and RMSNorm computes in fp32 internally, so nothing is lost. Checkpointing is the run's choice
    (train.enable_checkpointing), already set up before the method is applied.
    """
    refuse_fused_experts(model, bits)
    quant_experts.quantize_experts(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def refuse_fused_experts(model: torch.nn.Module, bits: int) -> None:
    """8-bit qlora's base must be quantizable: fused 3-D expert weights are packed in 4-bit NF4 only
    (bitsandbytes' own 8-bit replaces nn.Linear layers only), and they hold most of a mixture of experts'
    weights."""
    fused = experts.fused(model)
    if fused and bits != 4:
        share = sum(model.get_parameter(n).numel() for n in fused) / sum(p.numel() for p in model.parameters())
        raise MethodError(f"method qlora with method.quant_bits={bits}: {type(model).__name__} stores its experts as "
                          f"fused 3-D weights ({fused[0]} and {len(fused) - 1} more, {share:.0%} of the model), "
                          "which slimtune packs in 4-bit only; set method.quant_bits=4, or use method.name=lora")


def check_base(model_path: str, trust_remote_code: bool = False, bits: int = 4) -> None:
    """refuse_fused_experts from config.json alone (the model built on the meta device), before a load that
    would read the whole model first."""
    refuse_fused_experts(_meta_model(model_path, trust_remote_code), bits)


def _meta_model(model_path: str, trust_remote_code: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(models.load_config(model_path, trust_remote_code),
                                                trust_remote_code=trust_remote_code)


def load_base(path: str, dtype: str, trust_remote_code: bool, device: str,
              quantization: BitsAndBytesConfig | None) -> tuple:
    """models.load, with a qlora base's fused expert weights packed in NF4 on `device` (quant_experts).

    bitsandbytes quantizes nn.Linear layers only, so loading straight onto the GPU puts every fused expert
    there in 16-bit first: 54 GiB of Qwen3-30B-A3B's 57, where its 4-bit model holds about 16. A model with
    fused experts therefore loads onto the CPU (bitsandbytes quantizes its Linear layers there), each 16-bit
    expert stack goes to `device` to be packed as transformers sets it (quant_experts.packed_on_arrival), and
    the 4-bit rest follows: the GPU's peak is the 4-bit model plus one stack, and the host's the 16-bit model
    less its experts plus one stack. No accelerate dispatch is involved (a device_map that splits the model
    adds offload hooks that move weights at every forward)."""
    fused = quantization is not None and models.resolve(path).suffix != ".gguf" and bool(
        experts.fused(_meta_model(path, trust_remote_code)))
    if not fused:
        model, tokenizer = models.load(path, dtype, trust_remote_code, device, quantization)
        if quantization is not None:
            quant_experts.quantize_experts(model)
        return model, tokenizer
    with quant_experts.packed_on_arrival(device):
        model, tokenizer = models.load(path, dtype, trust_remote_code, "cpu", quantization)
    quant_experts.quantize_experts(model, device=device)  # any stack that did not arrive through setattr
    return model.to(device), tokenizer
