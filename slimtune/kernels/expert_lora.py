"""LoRA on a mixture of experts' fused expert weights, computed per expert from the low-rank factors.

peft adapts a fused 3-D expert weight (Qwen3-MoE / Mixtral `experts.gate_up_proj` [E, 2I, H] and `down_proj`
[E, H, I]) through lora.ParamWrapper: at each forward it registers a parametrization that hands the experts
module W + s B A for all E experts of the layer, a dense [E, out, in] tensor (~600M elements a layer at
Qwen3-30B-A3B), formed again in the checkpointed recompute, with a dense gradient of it in backward; over an NF4
stack (methods/quant_experts.py) the whole stack is dequantized first. Here the experts module's forward is
replaced by one that sorts the (token, expert) pairs by expert and computes, for the rows of each expert e,
x W_e^T + s (x A_e^T) B_e^T: B A is never formed, the base weight gets no gradient, and the LoRA factors get
theirs from the rows that reached their expert. Then the model's own gate (SwiGLU on gate_up), the down
projection likewise, the routing weights, and each token's sum over its experts, as the original forward does.

The matmuls are torch._grouped_mm on CUDA in bf16 (one kernel for all experts; offsets int32; every row
width 16-byte aligned), a loop over the experts that got rows elsewhere (MODE overrides it, for tests). One
autograd node per projection: it keeps the rows, x A^T and the factors for backward, not the weight, which it
reads again there (an NF4 stack is dequantized once in forward and once in backward, one stack at a time).

enable(model) binds this forward on the outermost ParamWrapper of each experts module it can take (one active
adapter, no dropout or variant, no LoRA bias, [E, out, in] weights without biases, concatenated gate and up);
the module and peft's parameters stay, so adapters save in peft's format; disable(model) puts peft's back.
Reference: peft's own forward (tests/kernels/test_expert_lora.py).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from . import bind

if TYPE_CHECKING:
    from torch.autograd.function import FunctionCtx

ATTR = "_slimtune_expert_lora"  # on each outermost wrapper: peft's forward, for the cases left to it
PROJECTIONS = ("gate_up_proj", "down_proj")
MODE = "auto"  # auto: grouped_mm on CUDA in bf16 where the widths align, else the loop; "grouped" | "loop"


@dataclass
class Groups:
    """Where each expert's rows lie in the rows sorted by expert."""
    offs: torch.Tensor  # [E] int32: the end of each expert's rows
    counts: torch.Tensor  # [E] rows per expert
    spans: list[tuple[int, int, int]] | None  # (expert, start, end) of experts with rows; None: grouped_mm


def rows_mm(x: torch.Tensor, w: torch.Tensor, g: Groups) -> torch.Tensor:
    """[S, K] rows times [E, K, N] weights: each expert's rows by its own matrix, [S, N]."""
    if g.spans is None:
        return torch._grouped_mm(x, w, offs=g.offs)
    out = x.new_zeros(x.shape[0], w.shape[-1])
    for e, start, end in g.spans:
        out[start:end] = x[start:end] @ w[e]
    return out


def expert_mm(a: torch.Tensor, b: torch.Tensor, g: Groups) -> torch.Tensor:
    """[M, S] times [S, N] summed over each expert's rows: [E, M, N] (zeros for an expert without rows)."""
    if g.spans is None:
        out = torch._grouped_mm(a, b, offs=g.offs)
        return out.masked_fill_((g.counts == 0)[:, None, None], 0)
    out = a.new_zeros(g.offs.shape[0], a.shape[0], b.shape[1])
    for e, start, end in g.spans:
        out[e] = a[:, start:end] @ b[start:end]
    return out


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The base stack [E, out, in] as a dense tensor of `dtype` (an NF4 stack dequantized whole, once)."""
    dense = weight.dequantize() if hasattr(weight, "packed") else weight
    return dense.to(dtype)


class _ExpertLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, x: torch.Tensor, weight: torch.Tensor, a: torch.Tensor | None,
                b: torch.Tensor | None, scale: float, groups: Groups) -> torch.Tensor:
        dtype = x.dtype
        y = rows_mm(x, _dense(weight, dtype).transpose(1, 2), groups)
        xa = None
        if a is not None:
            ac = a.to(dtype).contiguous()
            bc = b.to(dtype).contiguous()
            xa = rows_mm(x, ac.transpose(1, 2), groups)
            y = y.add_(rows_mm(xa, bc.transpose(1, 2), groups), alpha=scale)
        ctx.save_for_backward(x, xa, a, b)
        ctx.weight, ctx.scale, ctx.groups = weight, scale, groups
        return y

    @staticmethod
    def backward(ctx: FunctionCtx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, xa, a, b = ctx.saved_tensors
        g, groups, scale = grad_y.to(x.dtype).contiguous(), ctx.groups, ctx.scale
        gx = rows_mm(g, _dense(ctx.weight, x.dtype), groups) if ctx.needs_input_grad[0] else None
        if a is None:
            return gx, None, None, None, None, None
        ac = a.to(x.dtype).contiguous()
        bc = b.to(x.dtype).contiguous()
        gxa = rows_mm(g, bc, groups).mul_(scale)  # d loss / d (x A_e^T), [S, r]
        if gx is not None:
            gx = gx.add_(rows_mm(gxa, ac, groups))
        ga = expert_mm(gxa.T, x, groups).to(a.dtype) if ctx.needs_input_grad[2] else None
        gb = expert_mm(g.T, xa, groups).mul_(scale).to(b.dtype) if ctx.needs_input_grad[3] else None
        return gx, None, ga, gb, None, None


def expert_linear(x: torch.Tensor, weight: torch.Tensor, lora: tuple[torch.Tensor, torch.Tensor, float] | None,
                  groups: Groups) -> torch.Tensor:
    """Rows x [S, in] sorted by expert through their experts' weight [E, out, in] (16-bit or an NF4 stack) plus
    s (x A_e^T) B_e^T for lora = (A [E, r, in], B [E, out, r], s); [S, out] in x's dtype."""
    a, b, scale = lora if lora is not None else (None, None, 0.0)
    return _ExpertLinear.apply(x, weight, a, b, float(scale), groups)


def factors(wrapper: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A [E, r, in], B [E, out, r], scale) of a ParamWrapper's active adapter: views of peft's lora_A weight
    [E x r, in] (expert-major rows) and lora_B weight [out, r x E] (expert e in columns j x E + e)."""
    name = wrapper.active_adapters[0]
    a, b, n = wrapper.lora_A[name].weight, wrapper.lora_B[name].weight, wrapper.num_experts
    return a.view(n, -1, a.shape[-1]), b.view(b.shape[0], -1, n).permute(2, 0, 1), wrapper.scaling[name]


def _grouped(device: torch.device, dtype: torch.dtype, widths: list[int]) -> bool:
    if MODE != "auto":
        return MODE == "grouped"
    aligned = all(w * dtype.itemsize % 16 == 0 for w in widths)
    return hasattr(torch, "_grouped_mm") and device.type == "cuda" and dtype == torch.bfloat16 and aligned


def route(top_k_index: torch.Tensor, num_experts: int, grouped: bool) -> tuple[torch.Tensor, torch.Tensor, Groups]:
    """(order of the flattened (token, slot) pairs sorted by expert, each sorted pair's token, the groups)."""
    ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
    counts = ids.new_zeros(num_experts).index_add_(0, ids, torch.ones_like(ids))  # bincount's shape follows the data
    offs = counts.cumsum(0).to(torch.int32)
    spans = None
    if not grouped:
        ends = offs.tolist()
        spans = [(e, end - n, end) for e, (n, end) in enumerate(zip(counts.tolist(), ends)) if n]
    return order, order // top_k_index.shape[-1], Groups(offs, counts, spans)


def _gate(experts: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    """The model's own activation on the gate_up rows (transformers' _apply_gate where it has one)."""
    if hasattr(experts, "_apply_gate"):
        return experts._apply_gate(h)
    gate, up = h.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def moe_forward(experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor, loras: dict[str, tuple | None]) -> torch.Tensor:
    """The experts module's forward (hidden [T, H], top-k index and weights [T, k]) with the LoRA of each
    projection in `loras` (None: the base weight alone)."""
    dtype = _compute_dtype(hidden_states)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    widths = [*gate_up.shape[1:], *down.shape[1:]] + [lo[0].shape[1] for lo in loras.values() if lo]
    grouped = _grouped(hidden_states.device, dtype, widths)
    order, tokens, groups = route(top_k_index, gate_up.shape[0], grouped)
    with torch.autocast(hidden_states.device.type, enabled=False):
        x = hidden_states[tokens].to(dtype)
        h = _gate(experts, expert_linear(x, gate_up, loras["gate_up_proj"], groups))
        y = expert_linear(h, down, loras["down_proj"], groups)
        y = y * top_k_weights.reshape(-1)[order, None]
        # back to (token, slot) order and summed over the slots: deterministic, unlike index_add_'s atomics on CUDA
        pairs = y.new_empty(y.shape).index_copy_(0, order, y)
        return pairs.view(*top_k_index.shape, y.shape[-1]).sum(1).to(hidden_states.dtype)


def _chain(outer: torch.nn.Module) -> tuple[dict[str, torch.nn.Module], torch.nn.Module]:
    """The ParamWrappers nested from `outer` down, by the parameter each adapts, and the module under them."""
    wrappers, module = {}, outer
    while getattr(module, "parameter_name", None) and hasattr(module, "base_layer"):
        wrappers[module.parameter_name] = module
        module = module.base_layer
    return wrappers, module


def wrappers(outer: torch.nn.Module) -> list[torch.nn.Module]:
    """The ParamWrappers nested from `outer` down."""
    return list(_chain(outer)[0].values())


def _why_not(wrappers: dict[str, torch.nn.Module], module: torch.nn.Module) -> str | None:
    """Why these wrappers over `module` keep peft's forward (said once per run), or None when they can fuse."""
    name = type(module).__name__
    if not name.endswith("Experts") or set(wrappers) - set(PROJECTIONS):
        return f"LoRA on {', '.join(sorted(wrappers))} of a {name} (fused: gate_up_proj and down_proj of *Experts)"
    layout = (getattr(module, "is_transposed", False), getattr(module, "is_concatenated", True),
              getattr(module, "has_gate", True), getattr(module, "has_bias", False),
              getattr(module, "has_post_expert_norm", False))
    if layout != (False, True, True, False, False) or any(hasattr(module, f"{p}_bias") for p in PROJECTIONS):
        return f"a {name} laid out otherwise than [experts, out, in] with gate and up concatenated, no biases"
    stacks = [getattr(module, p, None) for p in PROJECTIONS]
    if any(s is None or s.ndim != 3 for s in stacks) or not hasattr(module, "act_fn") or (
            stacks[0].shape[1] != 2 * stacks[1].shape[2] or stacks[0].shape[2] != stacks[1].shape[1]):
        return f"a {name} without gate_up_proj [E, 2I, H] and down_proj [E, H, I] weights and an act_fn"
    for w in wrappers.values():
        adapters = [n for n in w.active_adapters if n in w.lora_A]
        if len(adapters) != 1:
            return f"{len(adapters)} active adapters on {w.parameter_name} (one is fused)"
        if not isinstance(w.lora_dropout[adapters[0]], torch.nn.Identity) or w.use_dora.get(adapters[0], False):
            return f"LoRA dropout or DoRA on {w.parameter_name} (peft's ParamWrapper runs it)"
        if w.lora_B[adapters[0]].bias is not None or not w._did_swap_in_out_features or w.num_experts != len(
                stacks[0]):
            return f"a LoRA bias or another layout on {w.parameter_name}"
    return None


def _forward(outer: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Bound to each outermost wrapper as a method; peft's forward where adapters are off, merged or changed."""
    wrappers, module = _chain(outer)
    live = all(not w.disable_adapters and not w.merged and len(w.active_adapters) == 1
               and w.active_adapters[0] in w.lora_A for w in wrappers.values())
    if len(args) != 2 or kwargs or not live or getattr(module, "_is_expert_parallel", False):
        return getattr(outer, ATTR)(hidden_states, *args, **kwargs)
    loras = {p: factors(wrappers[p]) if p in wrappers else None for p in PROJECTIONS}
    return moe_forward(module, hidden_states, args[0], args[1], loras)


def _outermost(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """peft's ParamWrappers that no other ParamWrapper wraps (the module the MoE block calls)."""
    inner = {id(m.base_layer) for m in model.modules() if getattr(m, "parameter_name", None)
             and hasattr(m, "base_layer")}
    for m in model.modules():
        if getattr(m, "parameter_name", None) and hasattr(m, "base_layer") and id(m) not in inner:
            yield m


def enable(model: torch.nn.Module, log: Callable[[str], None] = print) -> int:
    """Bind the grouped forward on every eligible experts module's LoRA wrappers; returns how many. Those that
    stay peft's are said in one line through `log`, with the first reason."""
    n, refused = 0, []
    for outer in _outermost(model):
        if hasattr(outer, ATTR):
            n += 1
            continue
        why = _why_not(*_chain(outer))
        if why is not None:
            refused.append(why)
            continue
        bind.bind(outer, _forward.__get__(outer, type(outer)), ATTR, outer.forward)
        n += 1
    if refused:
        log(f"fast path off: fused expert LoRA: {len(refused)} of {n + len(refused)} experts modules stay peft's: "
            f"{refused[0]}")
    return n


def disable(model: torch.nn.Module) -> None:
    """peft's own forward back on every wrapper enable() took."""
    bind.unbind(model, ATTR)


def enabled(model: torch.nn.Module) -> int:
    return bind.count(model, ATTR)
