"""Fused RMSNorm and SwiGLU through Liger-Kernel's Triton functions (train.fused_norm_mlp).

transformers' LlamaRMSNorm is six kernels (cast, pow, mean, rsqrt, mul, mul) and its MLP keeps silu(gate)
and the product besides gate and up; Liger's RMSNorm is one kernel each way, its SiLU-mul keeps only gate and
up and recomputes the rest in backward. enable(model) binds these forwards to the model's own modules
(every decoder layer's two norms and its MLP, and the final norm), instance by instance: nothing global is
patched, so other models in the process are untouched, and disable(model) gives the modules their own
forwards back. Only the Llama-style shapes are taken (RMSNorm with `weight` and `variance_epsilon`; an MLP
down(silu(gate(x)) * up(x))): anything else keeps its forward. The LoRA layers inside the MLP keep theirs.

The reference is the modules' own forward (tests/kernels/test_norm_mlp_gpu.py compares outputs and gradients
on a GPU). Liger runs on CUDA only and is an optional dependency: `pip install liger-kernel`.
"""
from __future__ import annotations

import importlib.util

import torch

from ..errors import MissingPackageError
from . import bind

ATTR = "_slimtune_norm_mlp"
NORM_TYPES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
MLP_TYPES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")


def available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def _norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    # offset 0, Llama casting (fp32 statistics, the weight multiplied in the input dtype), dY not overwritten
    return LigerRMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon, 0.0, "llama", False)


def _mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


def _eligible_mlp(m: torch.nn.Module) -> bool:
    act = getattr(getattr(m, "config", None), "hidden_act", None)
    return type(m).__name__ in MLP_TYPES and act in ("silu", "swish") and all(
        hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))


def enable(model: torch.nn.Module) -> int:
    """Bind Liger's forwards to every eligible norm and MLP; returns how many modules were taken."""
    if not available():
        raise MissingPackageError("train.fused_norm_mlp=on needs Liger-Kernel (pip install liger-kernel); "
                                  "train.fused_norm_mlp=auto uses it only where it is installed")
    n = 0
    for m in model.modules():
        if not hasattr(m, ATTR):
            if (type(m).__name__ in NORM_TYPES and hasattr(m, "variance_epsilon")
                    and getattr(m, "weight", None) is not None):
                bind.bind(m, _norm_forward.__get__(m, type(m)), ATTR)
            elif _eligible_mlp(m):
                bind.bind(m, _mlp_forward.__get__(m, type(m)), ATTR)
            else:
                continue
        n += 1
    return n


def disable(model: torch.nn.Module) -> None:
    bind.unbind(model, ATTR)
