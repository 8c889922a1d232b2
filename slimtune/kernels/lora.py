"""LoRA linear layers as one autograd node: y = x W^T + b + s (x A^T) B^T.

peft's lora.Linear runs the adapter as separate modules: a cast of x to the adapter's fp32 dtype,
lora_A, dropout, lora_B, a multiply by the scale and an add, each an autograd node (and under autocast
each matmul re-casts its inputs). Over the 7 x layers projections of a model, three times per step with
checkpointing, that is most of the CPU time of a 1B step on an H100 (profiled in bench/speed.py), and
the GPU waits on it. Here the whole layer is one Function: forward does the three matmuls in the compute
dtype with the adapter's update added in place (addmm), backward the five matmuls of the gradient by
hand. Same arithmetic as the module chain; the adapter weights and their gradients stay fp32.

enable(model) swaps the forward of every peft lora.Linear it can take (one active adapter, plain
LoRA (no DoRA or other variant), no dropout, an unquantized nn.Linear base, no LoRA bias, not merged);
disable(model) puts peft's back. Reference: the peft module itself (tests/kernels/test_lora.py).
"""
from __future__ import annotations

import functools

import torch

from . import bind

ATTR = "_slimtune_fused_lora"


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scale: float):
        dtype = _compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            shape = x.shape
            x2 = x.reshape(-1, shape[-1]).to(dtype)
            w, ac, bc = weight.to(dtype), a.to(dtype), b.to(dtype)
            xa = x2 @ ac.T
            y = torch.addmm(bias.to(dtype), x2, w.T) if bias is not None else x2 @ w.T
            y.addmm_(xa, bc.T, alpha=scale)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scale, ctx.dtype, ctx.x_dtype = scale, dtype, x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x2, xa, weight, a, b = ctx.saved_tensors
        dtype, scale = ctx.dtype, ctx.scale
        need_x, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:5]
        g = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
        ac, bc = a.to(dtype), b.to(dtype)
        gxa = (g @ bc).mul_(scale)  # d loss / d (x A^T), (N, r)
        gx = gw = gbias = ga = gb = None
        if need_x:
            gx = torch.addmm(g @ weight.to(dtype), gxa, ac).reshape(*grad_y.shape[:-1], x2.shape[-1]).to(ctx.x_dtype)
        if need_w:
            gw = (g.T @ x2).to(weight.dtype)
        if need_bias and ctx.bias_dtype is not None:
            gbias = g.sum(0).to(ctx.bias_dtype)
        if need_a:
            ga = (gxa.T @ x2).to(a.dtype)
        if need_b:
            gb = (g.T @ xa).mul_(scale).to(b.dtype)
        return gx, gw, gbias, ga, gb, None


def lora_linear(x, weight, bias, a, b, scale: float) -> torch.Tensor:
    """x @ weight.T + bias + scale * (x @ a.T) @ b.T as one autograd node; weight (out, in), a (r, in),
    b (out, r). Under autocast the matmuls run in its dtype; otherwise in x's."""
    return _LoraLinear.apply(x, weight, bias, a, b, float(scale))


def why_not(module) -> str | None:
    """Why this peft LoRA layer cannot run fused, or None when it can."""
    adapters = [n for n in module.active_adapters if n in module.lora_A]
    if len(adapters) != 1:
        return f"{len(adapters)} active adapters (fused layers take one)"
    if getattr(module, "fan_in_fan_out", False):
        return "fan_in_fan_out weights (Conv1D-style base layers)"
    name = adapters[0]
    if name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False):
        return "a LoRA variant (DoRA, ...) in peft's own forward"
    drop = module.lora_dropout[name]
    if not (isinstance(drop, torch.nn.Identity) or (isinstance(drop, torch.nn.Dropout) and drop.p == 0)):
        return f"LoRA dropout {getattr(drop, 'p', '?')} (fused layers need method.dropout=0)"
    base, la, lb = module.get_base_layer(), module.lora_A[name], module.lora_B[name]
    if type(base) is not torch.nn.Linear:
        return f"a {type(base).__name__} base layer (fused layers take an unquantized nn.Linear)"
    if type(la) is not torch.nn.Linear or type(lb) is not torch.nn.Linear or la.bias is not None or lb.bias is not None:
        return "adapter matrices with a bias or of another type than nn.Linear"
    return None


def _eligible(module) -> str | None:
    """The one adapter name this module can run fused, or None."""
    return None if why_not(module) else [n for n in module.active_adapters if n in module.lora_A][0]


def kept(model) -> tuple[int, str | None]:
    """(peft LoRA layers not fused, the first one's reason): what select prints when fused LoRA was asked."""
    from peft.tuners.lora import Linear as LoraLinear
    reasons = [why_not(m) for m in model.modules() if type(m) is LoraLinear and not hasattr(m, ATTR)]
    reasons = [r for r in reasons if r]
    return len(reasons), reasons[0] if reasons else None


def _forward(module, name: str, original, x: torch.Tensor, *args, **kwargs):
    if args or kwargs or module.disable_adapters or module.merged or list(module.active_adapters) != [name]:
        return original(x, *args, **kwargs)
    base = module.get_base_layer()
    return lora_linear(x, base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight,
                       module.scaling[name])


def enable(model) -> int:
    """Fuse every eligible peft LoRA Linear in `model`; returns how many."""
    from peft.tuners.lora import Linear as LoraLinear
    n = 0
    for module in model.modules():
        if type(module) is LoraLinear and not hasattr(module, ATTR):
            name = _eligible(module)
            if name is not None:
                original = module.forward
                bind.bind(module, functools.partial(_forward, module, name, original), ATTR, original)
                n += 1
    return n


def disable(model) -> None:
    """peft's own forward back on every layer enable() fused."""
    bind.unbind(model, ATTR)


def enabled(model) -> int:
    return bind.count(model, ATTR)
