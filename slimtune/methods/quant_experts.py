"""QLoRA's fused expert weights: each 3-D expert stack ([experts, out, in]) held as bitsandbytes NF4.

transformers' bitsandbytes integration replaces nn.Linear layers only, so a mixture of experts loaded with a
4-bit config keeps its fused experts (most of its weights: 95% of Qwen3-30B-A3B) in 16-bit. quantize_experts
(after a load) or packed_on_arrival (during one) packs them one stack at a time into Nf4Stack: a tensor that
reads as the dense [E, out, in] weight of its dtype and dequantizes whenever an op reads it. peft's LoRA on a
fused weight (lora.ParamWrapper) forms W + BA for the whole stack at each forward, and the per-expert path
(kernels/expert_lora.py) dequantizes the stack whole for its matmuls, so one dequantized stack per layer exists
at a time, as large as the 16-bit weight it replaces (engine/moe_memory.expert_copies counts it);
a single expert read by index (the experts' loop with the adapters off) dequantizes that expert's blocks only.
Same format as the Linear layers' (NF4, blocks of 64, 8-bit absmax over blocks of 256: double quantization).
"""
from __future__ import annotations

import contextlib
import threading
from typing import TYPE_CHECKING

import torch

from . import experts

if TYPE_CHECKING:
    from collections.abc import Iterator

    from bitsandbytes.functional import QuantState

aten = torch.ops.aten
BLOCK = 64


class Nf4Stack(torch.Tensor):
    """A frozen fused expert weight held in NF4 (packed two per byte) that reads as a dense tensor of its dtype.

    The wrapper's own device and dtype are the truth: Module.to() may assign a moved stack to `.data`, which
    changes them and not the packed tensors, so those follow on the next read (_synced)."""

    packed: torch.Tensor
    state: QuantState

    @staticmethod
    def __new__(cls, packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> Nf4Stack:
        return torch.Tensor._make_wrapper_subclass(cls, state.shape, dtype=dtype or state.dtype, device=packed.device,
                                                   requires_grad=False)

    def __init__(self, packed: torch.Tensor, state: QuantState, dtype: torch.dtype | None = None) -> None:
        self.packed, self.state = packed, state

    def __repr__(self, *, tensor_contents: object = None) -> str:
        return f"Nf4Stack(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device})"

    def __deepcopy__(self, memo: dict) -> Nf4Stack:
        out = Nf4Stack(self.packed.clone(), _state_to(self.state, self.packed.device), self.dtype)
        return torch.nn.Parameter(out, requires_grad=False) if isinstance(self, torch.nn.Parameter) else out

    @property
    def nbytes_stored(self) -> int:
        """Bytes the stack occupies: packed weights and absmax (8-bit here, plus its own fp32 scales; the 256-entry
        code tables are shared constants)."""
        s = self.state
        extra = s.state2.absmax.numel() * s.state2.absmax.element_size() if s.nested else 0
        return self.packed.numel() * self.packed.element_size() + s.absmax.numel() * s.absmax.element_size() + extra

    def _synced(self) -> tuple[torch.Tensor, QuantState]:
        if self.packed.device != self.device:
            self.packed, self.state = self.packed.to(self.device), _state_to(self.state, self.device)
        return self.packed, self.state

    def dequantize(self) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        packed, state = self._synced()
        return dequantize_4bit(packed, state).view(self.shape).to(self.dtype)

    def expert(self, index: int) -> torch.Tensor:
        """Expert `index`'s [out, in] weight, from its own blocks (a stack whose experts start on a block edge)."""
        from bitsandbytes.functional import QuantState, dequantize_4bit, dequantize_blockwise

        (packed, s), n = self._synced(), self.shape[1] * self.shape[2]
        if n % BLOCK:
            return self.dequantize()[index]
        index = index % self.shape[0]
        absmax = dequantize_blockwise(s.absmax, s.state2) + s.offset if s.nested else s.absmax
        one = QuantState(absmax=absmax[index * n // BLOCK:(index + 1) * n // BLOCK].contiguous(),
                         shape=torch.Size(self.shape[1:]), code=s.code, blocksize=s.blocksize,
                         quant_type=s.quant_type, dtype=s.dtype)
        return dequantize_4bit(packed[index * n // 2:(index + 1) * n // 2], one).view(self.shape[1:]).to(self.dtype)

    def moved(self, device: torch.device | str | None, dtype: torch.dtype | None) -> Nf4Stack:
        """The same stack on `device`, read as `dtype` (the packed weights stay 4-bit whatever the dtype)."""
        packed, state = self._synced()
        device = torch.device(device) if device is not None else self.device
        if device != self.device:
            packed, state = packed.to(device), _state_to(state, device)
        return Nf4Stack(packed, state, dtype or self.dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: object, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        kwargs = kwargs or {}
        first = args[0] if args else None
        if func in (aten.detach.default, aten.alias.default):
            return Nf4Stack(first.packed, first.state, first.dtype)
        if func is aten.set_.source_Tensor and args[1] is first:  # torch.nn.utils.parametrize re-sets the original
            return first
        if func is aten._to_copy.default and isinstance(first, Nf4Stack):
            return first.moved(kwargs.get("device"), kwargs.get("dtype"))
        if func is aten.select.int and isinstance(first, Nf4Stack) and args[1] == 0:
            return first.expert(int(args[2]))

        def dense(x: object) -> object:
            return x.dequantize() if isinstance(x, Nf4Stack) else x
        return func(*[dense(a) for a in args], **{k: dense(v) for k, v in kwargs.items()})


def _state_to(state: QuantState, device: torch.device) -> QuantState:
    from bitsandbytes.functional import QuantState

    nested = state.state2
    if nested is not None:
        nested = QuantState(absmax=nested.absmax.to(device), code=nested.code.to(device),
                            blocksize=nested.blocksize, dtype=nested.dtype)
    return QuantState(absmax=state.absmax.to(device), shape=state.shape, code=state.code.to(device),
                      blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype,
                      offset=None if state.offset is None else state.offset.to(device), state2=nested)


def quantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> Nf4Stack:
    """`weight` ([experts, out, in], 16/32-bit) as an NF4 stack read as `dtype` (default: the weight's)."""
    from bitsandbytes.functional import quantize_4bit

    packed, state = quantize_4bit(weight.detach().contiguous(), blocksize=BLOCK, compress_statistics=True,
                                  quant_type="nf4")
    return Nf4Stack(packed, state, dtype or weight.dtype)


def quantize_experts(model: torch.nn.Module, dtype: torch.dtype | None = None,
                     device: torch.device | str | None = None) -> list[str]:
    """Replace every fused expert weight of `model` by its frozen NF4 stack, one stack at a time (each 16-bit
    stack is freed as soon as it is packed, unless something else holds it); returns their names. device: where
    the stacks are packed and kept (default: where each weight is); a 16-bit stack moves there alone, so a model
    loaded on the CPU brings one 16-bit stack at a time to the GPU."""
    names = experts.fused(model)
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner)
        weight = module._parameters[leaf]
        if isinstance(weight, Nf4Stack):
            continue
        source = weight.detach() if device is None else weight.detach().to(device)
        module._parameters[leaf] = torch.nn.Parameter(quantize(source, dtype), requires_grad=False)
        del weight, source
    return names


@contextlib.contextmanager
def packed_on_arrival(device: torch.device | str, dtype: torch.dtype | None = None) -> Iterator[None]:
    """While a model loads in this thread: each fused expert weight set on an experts module (transformers sets
    them one at a time) is packed on `device` as it arrives, so the load holds one 16-bit stack at a time, not
    all of them (quantize_experts afterwards packs any that arrived another way)."""
    thread = threading.get_ident()

    def pack(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> torch.nn.Parameter | None:
        if (param is None or param.ndim != 3 or param.is_meta or isinstance(param, Nf4Stack)
                or threading.get_ident() != thread or not experts.is_experts_module(module)):
            return None  # the meta model's own weights, and anything another thread registers, as they are
        packed = torch.nn.Parameter(quantize(param.detach().to(device), dtype), requires_grad=False)
        # what transformers marks a loaded weight with, so that its initialization leaves it alone
        packed._is_hf_initialized = getattr(param, "_is_hf_initialized", False)
        return packed

    handle = torch.nn.modules.module.register_module_parameter_registration_hook(pack)
    try:
        yield
    finally:
        handle.remove()


def is_nf4(p: torch.Tensor) -> bool:
    return isinstance(p, Nf4Stack)
