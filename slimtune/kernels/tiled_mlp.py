"""The decoder's MLP a slice of the sequence at a time (train.tiled_mlp), for long records.

A Llama-style MLP, down(silu(gate(x)) * up(x)), keeps gate, up and their product for backward: at one
record of 64k tokens on an 8B model (intermediate 14,336) that is 3 x 64k x 14,336 x 2 bytes = 5.3 GiB for
the one layer being recomputed, more than the layer inputs of the whole model. As unsloth's and DeepSpeed's
TiledMLP do, forward runs the MLP on slices of `rows` tokens without keeping anything but the input, and
backward recomputes each slice with autograd on and back-propagates it at once, so the intermediates of
only one slice exist at a time. Weights' gradients (LoRA's A and B) accumulate slice by slice straight
into .grad, as autograd would; the input's gradient is returned to the outer graph. Cost: one more forward
of the MLP per step (the recompute). With checkpointing a layer runs forward twice and backward (about 4
forwards' FLOPs) and the MLP is 81% of an 8B layer's weights, so about +20% FLOPs at short lengths, less
where attention's quadratic share grows (estimated, not yet measured; unsloth's docs report about 1.3x step
time for theirs): auto turns it on only past select.TILE_TOKENS tokens a micro-batch.

enable(model) wraps the forward each MLP has (its class's, or Liger's SwiGLU from kernels/norm_mlp.py)
instance by instance; disable(model) puts that forward back. The forward's random numbers (LoRA dropout)
are replayed in the recompute from the RNG state saved at the start. Reference: the MLP's own forward
(tests/kernels/test_tiled_mlp.py compares outputs and every gradient over odd shapes).
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import norm_mlp

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx

ATTR = "_slimtune_tiled_mlp"  # on each tiled MLP: the forward it had (Liger's, bound by norm_mlp) or None
MIN = "_slimtune_tiled_min"  # and the token count past which it slices
MLP_TYPES = ("LlamaMLP", "Qwen2MLP", "Qwen3MLP", "MistralMLP")


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.forward, ctx.rows, ctx.rng = forward, rows, _rng_state(x.device)
        dev = x.device.type  # backward runs outside autocast: the recompute re-enters forward's, as checkpoint does
        ctx.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        ctx.save_for_backward(x)
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            out = torch.cat([forward(flat[i:i + rows]) for i in range(0, flat.shape[0], rows)])
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        flat, rows = x.reshape(-1, x.shape[-1]), ctx.rows
        grad = grad_out.reshape(-1, grad_out.shape[-1])
        gx = torch.empty_like(flat) if ctx.needs_input_grad[1] else None
        now = _rng_state(x.device)
        _set_rng_state(ctx.rng, x.device)  # the slices draw dropout masks in forward's order again
        try:
            for i in range(0, flat.shape[0], rows):
                part = flat[i:i + rows].detach().requires_grad_(gx is not None)
                with torch.enable_grad(), torch.autocast(ctx.autocast[0], ctx.autocast[1], enabled=ctx.autocast[2]):
                    out = ctx.forward(part)
                if out.requires_grad:
                    torch.autograd.backward(out, grad[i:i + rows])
                if gx is not None:
                    gx[i:i + rows] = part.grad if part.grad is not None else 0
        finally:
            _set_rng_state(now, x.device)
        return (None, gx.reshape(x.shape) if gx is not None else None, None) + (None,) * len(ctx.needs_input_grad[3:])


def tiled(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rows: int,
          params: tuple = ()) -> torch.Tensor:
    """forward(x) computed `rows` tokens at a time, keeping only x for backward. `params`: the trainable
    tensors forward uses; passing them makes autograd run backward here even when x needs no gradient."""
    return _TiledMLP.apply(forward, x, rows, *params)


def tile_rows(hidden: int, tokens: int) -> int:
    """Slice length: as DeepSpeed's TiledMLP, ceil(tokens / hidden) slices, so each slice is about `hidden`
    tokens (an 8B slice's intermediates: 4,096 x 14,336 x 2 bytes x 3 = 336 MiB) and its matmuls stay large."""
    return max(1, math.ceil(tokens / max(1, math.ceil(tokens / max(hidden, 1)))))


def _inner(module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward the tiling wraps, as a function of x: Liger's SwiGLU where norm_mlp bound it, another forward
    bound to the instance before, else the class's. Liger's is taken by its function, not the stored bound
    method, so a compiled layer (kernels/compiled.py) guards on no per-layer object."""
    if hasattr(module, norm_mlp.ATTR):
        return functools.partial(norm_mlp._mlp_forward, module)
    own = getattr(module, ATTR)
    return own if own is not None else functools.partial(type(module).forward, module)


def _forward(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Bound to each MLP as a method, the threshold an attribute (a functools.partial per MLP would make
    torch.compile guard on its identity and recompile the compiled decoder layer once per layer)."""
    original = _inner(module)
    min_tokens = getattr(module, MIN)
    tokens = x.numel() // x.shape[-1]
    if tokens <= min_tokens or not torch.is_grad_enabled():
        return original(x)
    rows = tile_rows(x.shape[-1], tokens)
    if rows >= tokens:
        return original(x)
    params = tuple(p for p in module.parameters() if p.requires_grad)
    return tiled(original, x, rows, params)


def eligible(m: torch.nn.Module) -> bool:
    return type(m).__name__ in MLP_TYPES and all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))


def enable(model: torch.nn.Module, min_tokens: int = 0) -> int:
    """Tile every eligible MLP's forward when a forward brings more than `min_tokens` tokens; how many."""
    n = 0
    for m in model.modules():
        if not hasattr(m, ATTR):
            if not eligible(m):
                continue
            own = m.__dict__.get("forward")  # Liger's bound forward (norm_mlp) or None: the class's
            setattr(m, MIN, min_tokens)
            m.forward = _forward.__get__(m, type(m))
            setattr(m, ATTR, own)
        n += 1
    return n


def disable(model: torch.nn.Module) -> None:
    """The forward each MLP had before enable()."""
    for m in model.modules():
        if hasattr(m, ATTR):
            own = getattr(m, ATTR)
            if own is None:
                del m.forward
            else:
                m.forward = own
            delattr(m, ATTR)
            delattr(m, MIN)


def enabled(model: torch.nn.Module) -> int:
    return sum(hasattr(m, ATTR) for m in model.modules())
