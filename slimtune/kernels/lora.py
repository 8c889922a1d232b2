"""LoRA linear layers as one autograd node: y = x W^T + b + s (x A^T) B^T.

peft's lora.Linear runs the adapter as separate modules: a cast of x to the adapter's fp32 dtype,
lora_A, dropout, lora_B, a multiply by the scale and an add, each an autograd node (and under autocast
each matmul re-casts its inputs). Over the 7 x layers projections of a model, three times per step with
checkpointing, that is most of the CPU time of a 1B step on an H100 (profiled in bench/speed.py), and
the GPU waits on it. Here the whole layer is one Function: forward does the three matmuls in the compute
dtype with the adapter's update added in place (addmm), backward the five matmuls of the gradient by
hand. Same arithmetic as the module chain; the adapter weights and their gradients stay fp32.

enable(model) swaps the forward of every peft LoRA Linear it can take (one active adapter, plain
LoRA (no DoRA or other variant), no dropout, an nn.Linear or bitsandbytes 4-bit base (kernels/qlora.py's
node), no LoRA bias, not merged); disable(model) puts peft's back. Reference: the peft module itself
(tests/kernels/test_lora.py, test_qlora.py).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from . import bind, lora_math, qlora

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx

ATTR = "_slimtune_fused_lora"  # on each fused layer: peft's forward, for the cases the node leaves to it
NAME = "_slimtune_fused_lora_adapter"  # and the adapter it fused


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            w, ac, bc = weight.to(dtype), lora_math.cast(a, dtype), lora_math.cast(b, dtype)
            xa = x2 @ ac.T
            y = lora_math.output(x2, w, bias, xa, bc, scale)
        ctx.save_for_backward(x2, xa)  # activations: checkpointing drops and recomputes them
        ctx.weights = weight, a, b  # parameters, alive anyway: no saved-tensor hook calls for them
        ctx.scale, ctx.dtype, ctx.x_dtype = scale, dtype, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: FunctionCtx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2, xa = ctx.saved_tensors
        weight, a, b = ctx.weights
        dtype, scale = ctx.dtype, ctx.scale
        need_x, need_w = ctx.needs_input_grad[:2]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        ac, bc = lora_math.cast(a, dtype), lora_math.cast(b, dtype)
        gxa = (g @ bc).mul_(scale)  # d loss / d (x A^T), (N, r)
        gx = gw = None
        if need_x:
            gx = lora_math.input_grad(g, weight.to(dtype), gxa, ac)
            gx = gx.reshape(*grad_y.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
        if need_w:
            gw = (g.T @ x2).to(weight.dtype)
        return gx, gw, *lora_math.adapter_grads(ctx, g, gxa, x2, xa, a, b), None


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """x @ weight.T + bias + scale * (x @ a.T) @ b.T as one autograd node; weight (out, in), a (r, in),
    b (out, r). Under autocast the matmuls run in its dtype; otherwise in x's."""
    return _LoraLinear.apply(x, weight, bias, a, b, float(scale))


def _why_not(module: torch.nn.Module) -> str | None:
    """Why this peft LoRA layer cannot run as one node (said once per run), or None when it can."""
    adapters = [n for n in module.active_adapters if n in module.lora_A]
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters (one is fused)"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out weights (Conv1D-style layers)"
    name = adapters[0]
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
        return "DoRA or another LoRA variant (peft's layers run it)"
    drop = module.lora_dropout[name]
    if not (isinstance(drop, torch.nn.Identity) or (isinstance(drop, torch.nn.Dropout) and drop.p == 0)):
        return f"LoRA dropout {getattr(drop, 'p', drop)} (set method.dropout=0 to fuse)"
    base, la, lb = module.get_base_layer(), module.lora_A[name], module.lora_B[name]
    if type(base) is not torch.nn.Linear and not qlora.is_4bit(base):
        return f"a {type(base).__name__} base (fused: nn.Linear and bitsandbytes 4-bit; 8-bit is not)"
    if type(la) is not torch.nn.Linear or type(lb) is not torch.nn.Linear or la.bias is not None or lb.bias is not None:
        return "the adapter's own bias (lora_bias)"
    return None


def _forward(module: torch.nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Bound to each fused layer as a method (not a functools.partial holding the layer: torch.compile guards on
    a partial's identity, so compiled decoder layers (kernels/compiled.py) would recompile once per layer)."""
    name = getattr(module, NAME)
    if args or kwargs or module.disable_adapters or module.merged or list(module.active_adapters) != [name]:
        return getattr(module, ATTR)(x, *args, **kwargs)  # peft's forward
    base, scale = module.get_base_layer(), module.scaling[name]
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    if type(base) is torch.nn.Linear:
        return lora_linear(x, base.weight, base.bias, a, b, scale)
    if not qlora.is_4bit(base):  # its quant_state lost or repacked since enable: bitsandbytes' own path
        return getattr(module, ATTR)(x, *args, **kwargs)
    return qlora.forward(base, a, b, scale, x)


def _lora_layers(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """peft's LoRA Linear layers, over an nn.Linear or a bitsandbytes base (peft.tuners.lora.bnb)."""
    from peft.tuners.lora import Linear as LoraLinear
    for module in model.modules():
        if type(module) is LoraLinear or type(module).__module__ == "peft.tuners.lora.bnb":
            yield module


def enable(model: torch.nn.Module, log: Callable[[str], None] = print) -> int:
    """Fuse every eligible peft LoRA Linear in `model`; returns how many. Layers that stay peft's are said
    in one line through `log`, with the first reason."""
    n, refused = 0, []
    for module in _lora_layers(model):
        if hasattr(module, ATTR):
            continue
        why = _why_not(module)
        if why is not None:
            refused.append(why)
            continue
        original, name = module.forward, next(a for a in module.active_adapters if a in module.lora_A)
        setattr(module, NAME, name)
        bind.bind(module, _forward.__get__(module, type(module)), ATTR, original)
        n += 1
    if refused:
        log(f"fused LoRA layers: {len(refused)} of {n + len(refused)} stay peft's: {refused[0]}")
    return n


def disable(model: torch.nn.Module) -> None:
    """peft's own forward back on every layer enable() fused."""
    for module in model.modules():
        if hasattr(module, NAME):
            delattr(module, NAME)
    bind.unbind(model, ATTR)


def enabled(model: torch.nn.Module) -> int:
    return bind.count(model, ATTR)
