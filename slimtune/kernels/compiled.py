"""Decoder layers compiled one by one (regional torch.compile): the fix for a step paced by the CPU launching
kernels. A small model's step is hundreds of small kernels per layer (norms, RoPE, residual adds, casts); the
GPU finishes each before the CPU has launched the next (1B, 16 records a step: 166 ms of GPU work in a ~400 ms
step, profile of 2026-11-23). Inductor fuses each layer's elementwise chains into a few Triton kernels and
launches them from generated code.

Every decoder layer of one model runs the same code, so one compiled graph serves all of them (dynamo guards on
the layer's parameter shapes, not on which layer it is: one compile, whatever the depth), and dynamic=True
gives one graph for every row length (packed rows change length each step). The layer's own forward is compiled,
not its __call__: transformers' checkpointing (GradientCheckpointingLayer.__call__) stays outside, and its
recompute in backward calls the compiled forward again.

Only training forwards take the compiled path (grad enabled); evaluation and generation (no grad, caches,
masks) run the layer's eager forward, so they neither wait for new graphs nor depend on them. Layers over a
4-bit base compile with the fused 4-bit node traced inside (kernels/qlora.py): on an H100 (torch 2.11, 2026-12-06)
every LoRA gradient within cosine 0.9991 of the eager layers' (bench/check_compiled_4bit.py), and 1B QLoRA at
23,051 / 25,606 tok/s against 16,402 eager. Where any 4-bit layer runs bitsandbytes' own forward instead (no LoRA
on it, or LoRA the node does not take: dropout, DoRA), the layers stay eager (unfused_4bit): that path was never
checked compiled. So do layers with LoRA on fused expert weights, peft's (parametrized) or
kernels/expert_lora.py's (grouped_experts).
A compile that fails (an op inductor cannot lower) puts every layer of the model back on its eager forward, with
one printed line saying why: the run goes on at eager speed rather than stopping.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from . import bind, expert_lora, lora, qlora

ATTR = "_slimtune_compiled"
BACKEND = "inductor"  # tests on the CPU pass "aot_eager": the same graphs, no C++/Triton code generation


def layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers: transformers marks them as GradientCheckpointingLayer (every family it ships)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # transformers < 4.52
        return []
    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def available() -> bool:
    """Inductor's GPU code is Triton: without it torch.compile would fail at the first step."""
    try:
        from torch.utils._triton import has_triton
    except ImportError:
        return False
    return bool(has_triton())


def parametrized(model: torch.nn.Module) -> bool:
    """Whether `model` holds peft's LoRA on a fused weight (lora.ParamWrapper, which names the parameter it adapts)
    that runs peft's forward: it registers a parametrization at each forward, a new class each time, where dynamo
    breaks the graph and recompiles until its limit (tiny Qwen3-MoE with LoRA on its experts, aot_eager: 31 graph
    breaks and the recompile limit in 3 steps), so such layers stay eager. Wrappers kernels/expert_lora.py took
    run its forward instead, which traces (one graph on the grouped_mm path)."""
    taken = {id(w) for m in model.modules() if hasattr(m, expert_lora.ATTR) for w in expert_lora.wrappers(m)}
    return any(getattr(m, "parameter_name", None) and id(m) not in taken for m in model.modules())


def unfused_4bit(model: torch.nn.Module) -> int:
    """How many bitsandbytes 4-bit layers of `model` run bitsandbytes' own forward, not kernels/qlora.py's node (no
    LoRA on them, or LoRA that stayed peft's): compiled layers were checked on a GPU around the node only, so a
    model with any stays eager."""
    fused = {id(m.get_base_layer()) for m in model.modules() if hasattr(m, lora.ATTR)}
    return sum(qlora.linear_4bit(m) and id(m) not in fused for m in model.modules())


def grouped_experts(model: torch.nn.Module) -> bool:
    """Whether kernels/expert_lora.py runs LoRA on fused expert weights in `model`. Compiled by inductor on an H200
    (torch 2.11), the layer's torch._grouped_mm got an operand in a layout it refuses ("Invalid strides/sizes",
    tests/kernels/test_expert_lora_gpu.py, 2026-12-05), so such layers stay eager: the path itself is the speed-up
    (no W + BA of the whole stack), and peft's path left them eager too."""
    return any(hasattr(m, expert_lora.ATTR) for m in model.modules())


def enable(model: torch.nn.Module, log: Callable[[str], None] = print, backend: str | None = None) -> int:
    """Compile each decoder layer's forward (already-bound fast paths inside it included); how many (none in a
    model with LoRA on fused expert weights, parametrized or grouped_experts, or with 4-bit layers off the fused
    node, unfused_4bit)."""
    state, backend = {"failed": None, "log": log}, backend or BACKEND
    n = 0
    for layer in [] if parametrized(model) or grouped_experts(model) or unfused_4bit(model) else layers(model):
        if hasattr(layer, ATTR):
            n += 1
            continue
        original = layer.forward
        compiled = torch.compile(original, dynamic=True, backend=backend)
        bind.bind(layer, functools.partial(_forward, original, compiled, state), ATTR)
        n += 1
    if n:
        log(f"compile: {n} decoder layers through torch.compile ({backend}, one graph for all of them); the first "
            "training step waits for the compile")
    return n


def _forward(original: Callable[..., Any], compiled: Callable[..., Any], state: dict, *args: Any,
             **kwargs: Any) -> Any:
    if state["failed"] is not None or not torch.is_grad_enabled():
        return original(*args, **kwargs)
    try:
        return compiled(*args, **kwargs)
    except torch._dynamo.exc.TorchDynamoException as err:  # inductor's own failures arrive wrapped in these
        inner = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed: the backend's own error
        reason = f"{type(inner).__name__}: {str(inner).strip().splitlines()[0][:300] if str(inner).strip() else ''}"
        state["failed"] = reason
        state["log"](f"fast path off: train.compile: torch.compile failed on a decoder layer ({reason}); every "
                     "layer runs its eager forward from here (set train.compile=off to skip the attempt)")
        return original(*args, **kwargs)


def disable(model: torch.nn.Module) -> None:
    bind.unbind(model, ATTR)


def enabled(model: torch.nn.Module) -> int:
    return bind.count(model, ATTR)
