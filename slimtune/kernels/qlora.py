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

from typing import TYPE_CHECKING

import torch

from . import lora_math

if TYPE_CHECKING:
    from bitsandbytes.functional import QuantState
    from torch.autograd.function import FunctionCtx


# what the node's dequantization reads besides the packed weight: (absmax, absmax2, code2, offset), the last three
# None unless the absmax is itself quantized (double quant); and (blocksize, blocksize2, quant_type, shape, dtype)
Parts = tuple["torch.Tensor", "torch.Tensor | None", "torch.Tensor | None", "torch.Tensor | None"]
Meta = tuple[int, int, str, tuple[int, ...], torch.dtype]


def parts(state: QuantState) -> tuple[Parts, Meta]:
    """A QuantState as tensors and constants: what the node takes, so that dynamo traces it (inside compiled
    decoder layers) without a Python object among its inputs; the same for every layer of one projection's shape."""
    nested = (state.state2.absmax, state.state2.code, state.offset) if state.nested else (None, None, None)
    blocksize2 = state.state2.blocksize if state.nested else 0
    return (state.absmax, *nested), (state.blocksize, blocksize2, state.quant_type, tuple(state.shape), state.dtype)


def dequantize_parts(qweight: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                     code2: torch.Tensor | None, offset: torch.Tensor | None, meta: Meta) -> torch.Tensor:
    """dequantize_4bit from parts(): bitsandbytes' two operators (the nested absmax, then the 4-bit weight),
    which it registers with shape functions, so dynamo and inductor keep them as calls in the graph."""
    blocksize, blocksize2, quant_type, shape, dtype = meta
    if absmax2 is not None:
        absmax = torch.ops.bitsandbytes.dequantize_blockwise(absmax, absmax2, code2, blocksize2, torch.float32) + offset
    return torch.ops.bitsandbytes.dequantize_4bit(qweight, absmax.float(), blocksize, quant_type, list(shape), dtype)


def _matmul_dtype(x: torch.Tensor, compute: torch.dtype | None) -> torch.dtype:
    """The matmuls' dtype: autocast's where it is on (as peft's adapter chain runs), else the layer's
    compute dtype (bitsandbytes casts x to it), else x's."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return compute or x.dtype


class _Lora4bit(torch.autograd.Function):
    """Inputs 2, 3, 4 are bias, A, B (lora_math.adapter_grads reads their needs_input_grad there)."""

    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, qweight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, absmax: torch.Tensor, absmax2: torch.Tensor | None,
                code2: torch.Tensor | None, offset: torch.Tensor | None, meta: Meta, scale: float,
                compute: torch.dtype | None) -> torch.Tensor:
        dtype = _matmul_dtype(x, compute)
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            w = dequantize_parts(qweight, absmax, absmax2, code2, offset, meta).to(dtype)
            ac, bc = lora_math.cast(a, dtype), lora_math.cast(b, dtype)
            xa = x2 @ ac.T
            y = lora_math.output(x2, w, bias, xa, bc, scale)
            del w  # the 16-bit weight lives only for this node's forward: backward dequantizes it again
        ctx.save_for_backward(x2, xa)  # activations: checkpointing drops and recomputes them
        # the adapter's and the 4-bit base's tensors live in the model anyway: on ctx without saved-tensor hooks
        ctx.weights, ctx.quantized = (a, b), (qweight, absmax, absmax2, code2, offset)
        ctx.meta, ctx.scale, ctx.dtype, ctx.x_dtype = meta, scale, dtype, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # x's dtype, as bitsandbytes returns it. Traced (compiled layers), an output that is a view of the in-place
        # updated y got all-zero gradients (x, A and B) on an H200, torch 2.11, whenever no cast made it a new tensor
        return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype, copy=torch.compiler.is_compiling())

    @staticmethod
    def backward(ctx: FunctionCtx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xa = ctx.saved_tensors
        (a, b), quantized = ctx.weights, ctx.quantized
        dtype, scale = ctx.dtype, ctx.scale
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        ac, bc = lora_math.cast(a, dtype), lora_math.cast(b, dtype)
        gxa = (g @ bc).mul_(scale)  # d loss / d (x A^T), (N, r)
        gx = None
        if ctx.needs_input_grad[0]:
            w = dequantize_parts(*quantized, ctx.meta).to(dtype)
            gx = lora_math.input_grad(g, w, gxa, ac).reshape(*grad_y.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
            del w
        return gx, None, *lora_math.adapter_grads(ctx, g, gxa, x2, xa, a, b), *[None] * 7


def lora_4bit_linear(x: torch.Tensor, qweight: torch.Tensor, state: QuantState, bias: torch.Tensor | None,
                     a: torch.Tensor, b: torch.Tensor, scale: float, compute: torch.dtype | None = None
                     ) -> torch.Tensor:
    """x @ dequant(qweight, state).T + bias + scale * (x @ a.T) @ b.T as one autograd node, in x's dtype.

    Its inputs are tensors and constants (parts(state)), so inside compiled decoder layers (kernels/compiled.py)
    dynamo traces it into the layer's graph, bitsandbytes' operators as calls. The dequantizer is this module's
    dequantize_parts (tests put reference.dequantize_nf4 in its place).

    Args:
        qweight, state: the packed 4-bit weight and its bitsandbytes QuantState (no gradient flows to them).
        compute: the dtype the matmuls run in outside autocast (bitsandbytes' compute_dtype); None: x's.
    """
    tensors, meta = parts(state)
    return _Lora4bit.apply(x, qweight, bias, a, b, *tensors, meta, float(scale), compute)


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
