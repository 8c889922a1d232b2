"""QLoRA's layer as one autograd node: y = x dequant(W4)^T + b + s (x A^T) B^T over a bitsandbytes 4-bit base.

peft's lora.bnb.Linear4bit runs bitsandbytes' Linear4bit (a cast of x to the compute dtype, MatMul4Bit, a
cast back), a defensive clone of its output, then the adapter chain kernels/lora.py describes: about a
dozen autograd nodes per projection, and the CPU launching them paces a small model's step. Here, as in
unsloth's fast_dequantize + matmul_lora, forward dequantizes the NF4 weight into the compute dtype, does the
base and the adapter matmuls and lets the dequantized weight go; only x (compute dtype) and x A^T are saved,
never the 16-bit weight, and backward dequantizes it again for the input's gradient. The adapter weights and
their gradients stay fp32, as in peft.

kernels/lora.py's enable() takes these layers beside the unquantized ones (eligible() says which); the
reference is peft's own module (tests/kernels/test_qlora.py) and reference.dequantize_nf4, bitsandbytes'
format in plain PyTorch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import lora_math

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState
    from torch.autograd.function import FunctionCtx


def dequantize(weight: torch.Tensor, state: QuantState) -> torch.Tensor:
    """bitsandbytes' dequantize_4bit: the (out, in) weight in the dtype it was quantized from."""
    import bitsandbytes.functional as bnbf  # optional dependency, loaded only for a 4-bit base

    return bnbf.dequantize_4bit(weight, state)


def _matmul_dtype(x: torch.Tensor, compute: torch.dtype | None) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on (as peft's adapter chain runs), else the layer's
    compute dtype (bitsandbytes casts x to it), else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return compute or x.dtype


class _Lora4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, state: QuantState, scale: float, compute: torch.dtype | None,
                dequant: Callable[[torch.Tensor, QuantState], torch.Tensor]) -> torch.Tensor:
        dtype = _matmul_dtype(x, compute)
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            w = dequant(qweight, state).to(dtype)
            ac, bc = a.to(dtype), b.to(dtype)
            xa = x2 @ ac.T
            y = lora_math.output(x2, w, bias, xa, bc, scale)
            del w  # the 16-bit weight lives only for this node's forward: backward dequantizes it again
        ctx.save_for_backward(x2, xa, qweight, a, b)
        ctx.state, ctx.dequant, ctx.scale, ctx.dtype, ctx.x_dtype = state, dequant, scale, dtype, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)  # bitsandbytes returns x's dtype

    @staticmethod
    def backward(ctx: FunctionCtx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xa, qweight, a, b = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        ac, bc = a.to(dtype), b.to(dtype)
        gxa = (g @ bc).mul_(scale)  # d loss / d (x A^T), (N, r)
        gx = None
        if ctx.needs_input_grad[0]:
            w = ctx.dequant(qweight, ctx.state).to(dtype)
            gx = torch.addmm(g @ w, gxa, ac).reshape(*grad_y.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
            del w
        return gx, None, *lora_math.adapter_grads(ctx, g, gxa, x2, xa, a, b), None, None, None, None


@torch.compiler.disable
def lora_4bit_linear(x: torch.Tensor, qweight: torch.Tensor, state: QuantState, bias: torch.Tensor | None,
                     a: torch.Tensor, b: torch.Tensor, scale: float, compute: torch.dtype | None = None,
                     dequant: Callable[[torch.Tensor, QuantState], torch.Tensor] = dequantize) -> torch.Tensor:
    """x @ dequant(qweight, state).T + bias + scale * (x @ a.T) @ b.T as one autograd node, in x's dtype.

    Opaque to torch.compile: inside compiled decoder layers (kernels/compiled.py) the node runs eagerly between
    the compiled regions. Traced by dynamo (torch 2.11, inductor, CUDA; args a QuantState object and a callable),
    its A and B gradients came back all zeros while the eager node's matched peft's.

    Args:
        qweight, state: the packed 4-bit weight and its bitsandbytes QuantState (no gradient flows to them).
        compute: the dtype the matmuls run in outside autocast (bitsandbytes' compute_dtype); None: x's.
        dequant: (qweight, state) -> the (out, in) weight; reference.dequantize_nf4 is the same in plain PyTorch.
    """
    return _Lora4bit.apply(x, qweight, bias, a, b, state, float(scale), compute, dequant)


def linear_4bit(module: torch.nn.Module) -> bool:
    """A bitsandbytes Linear4bit (by its type's name: bitsandbytes is imported only for a 4-bit base)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def is_4bit(base: torch.nn.Module) -> bool:
    """A bitsandbytes Linear4bit whose weight is packed as dequantize_4bit reads it."""
    if not linear_4bit(base):
        return False
    state = getattr(base.weight, "quant_state", None)
    # bitsandbytes repacks the weight for its AVX512 CPU kernel in inference; dequantize_4bit does not read that
    return state is not None and not getattr(state, "packing_format_for_cpu", False)


def forward(base: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, scale: float, x: torch.Tensor) -> torch.Tensor:
    """The fused node on peft's layer parts: its bitsandbytes Linear4bit base and the adapter's A and B weights."""
    return lora_4bit_linear(x, base.weight, base.weight.quant_state, base.bias, a, b, scale,
                            getattr(base, "compute_dtype", None))
