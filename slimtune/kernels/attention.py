"""Attention for packed rows: every record attends causally to itself only.

Registered with transformers as attention implementation "slimtune_packed" (AttentionInterface, plus a
mask function in AttentionMaskInterface). Single-row forwards without a padding mask (the packed rows
of data/pack.py, which bring cu_seq_lens_q and max_length_q) go to
  - CUDA, bf16/fp16, no attention dropout: torch.nn.attention.varlen.varlen_attn, PyTorch's own
    FlashAttention-2 varlen kernel (no flash-attn package needed): no mask, no padding, O(T) memory;
  - elsewhere (CPU, fp32, dropout): reference.packed_attention, one causal SDPA call per record, which
    computes what the unpacked forward computes for each record.
Every other forward (padded batches in eval, generation with a cache, left padding) goes to transformers'
own SDPA with the mask it builds, so a model left switched over still evaluates and generates correctly.

torch.nn.attention.varlen changed between releases (is_causal became window_size=(-1, 0) in early 2026,
enable_gqa came later), so the call is built from the installed signature: see _varlen_kwargs. Without
enable_gqa, a model with fewer key/value heads gives them to the kernel as they are where check_kernel_gqa found
that right on this GPU (once, at enable()), and repeats them otherwise.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch

from ..data.pack import BOUNDS
from ..errors import UnsupportedError
from . import reference

NAME = "slimtune_packed"
HALF = (torch.bfloat16, torch.float16)
# A row of one record (a long record, micro_batch_size 1) on the fast path: "varlen" the kernel every packed row
# takes; "sdpa" transformers' SDPA call with torch's backend choice; "cudnn" the same with SDPA's cuDNN backend
# first (reported 1.7-2.3x FlashAttention-2's speed on Hopper). bench/attention_speed.py times them.
ONE_RECORD = "varlen"


@functools.cache
def _varlen_fn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def varlen_available() -> bool:
    return _varlen_fn() is not None and torch.cuda.is_available()


@functools.cache
def _varlen_params() -> frozenset:
    return frozenset(inspect.signature(_varlen_fn()).parameters)


# Whether the installed varlen_attn, without enable_gqa, computes grouped-query attention from fewer key/value
# heads as they are (None: not checked; check_kernel_gqa sets it, enable() runs that on a GPU)
KERNEL_GQA: bool | None = None


def check_kernel_gqa(device: str = "cuda") -> bool:
    """Whether varlen_attn, given a key/value head per group of query heads and no enable_gqa (the releases before
    it document equal heads and check nothing), gives the output and the q/k/v gradients that repeated heads give:
    its FlashAttention-2 kernel reads each group's head itself, which saves a repeat_interleave of k and v per
    layer and forward, and their sum in backward. Tried once on a small random case; any error or difference
    beyond bf16 rounding: False (the heads are then repeated)."""
    fn, params = _varlen_fn(), _varlen_params()
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(96, h, 64, generator=g, device=device, dtype=torch.bfloat16, requires_grad=True)
               for h in (4, 2, 2))
    cu = torch.tensor([0, 40, 96], dtype=torch.int32, device=device)
    kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    weight = torch.randn(96, 4, 64, generator=g, device=device, dtype=torch.bfloat16)
    try:
        with torch.enable_grad():
            got_out = fn(q, k, v, cu, cu, 56, 56, **kw)
            got = torch.autograd.grad((got_out.float() * weight).sum(), (q, k, v))
            want_out = fn(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), cu, cu, 56, 56, **kw)
            want = torch.autograd.grad((want_out.float() * weight).sum(), (q, k, v))
    except Exception:  # noqa: BLE001 - refused in any way: repeat the heads
        return False
    pairs = [(got_out, want_out), *zip(got, want)]
    return all(a.shape == b.shape and float((a.float() - b.float()).abs().max()) <= 2e-2 * float(b.float().abs().max())
               for a, b in pairs)


def _varlen_kwargs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                   window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """q/k/v and keyword arguments for the installed varlen_attn."""
    params, kw = _varlen_params(), {}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            kw["enable_gqa"] = True
        elif not KERNEL_GQA:  # unchecked, or the kernel did not compute it right: equal heads
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if "scale" in params:
        kw["scale"] = scale
    elif scale is not None:  # the kernel's own scale is 1/sqrt(D)
        q = q * (scale * q.shape[-1] ** 0.5)
    if "window_size" in params:
        kw["window_size"] = (window - 1 if window else -1, 0)  # a tuple: varlen_attn compares with (-1, 0)
    else:
        kw["is_causal"] = True
    return q, k, v, kw


def varlen(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor, max_length: int,
           scale: float | None = None, window: int | None = None) -> torch.Tensor:
    """Fast path: (1, H, T, D) query, (1, H_kv, T, D) key/value -> (1, T, H, D)."""
    dtype = query.dtype
    if dtype not in HALF:  # fp32 activations under autocast (RoPE in fp32): the kernel takes half only
        dtype = torch.get_autocast_dtype("cuda")
    # (T, H, D) views: squeeze, not t[0], whose backward writes each gradient into a new zero-filled (1, H, T, D)
    # tensor (three per layer), in a layout RoPE's and the projections' backward then copy again
    q, k, v = (t.squeeze(0).transpose(0, 1).to(dtype) for t in (query, key, value))
    q, k, v, kw = _varlen_kwargs(q, k, v, scale, window)
    cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
    out = _varlen_fn()(q, k, v, cu, cu, int(max_length), int(max_length), **kw)
    return out.unsqueeze(0)


def _fast(query: torch.Tensor, dropout: float, window: int | None) -> bool:
    if not query.is_cuda or _varlen_fn() is None or dropout > 0 or query.shape[-1] > 256:
        return False
    if window and "window_size" not in _varlen_params():  # the first varlen_attn had no sliding window
        return False
    return query.dtype in HALF or (torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") in HALF)


def _segments(query: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, int]:
    """(cu_seq_lens, longest record) of a single row: from the batch, else from restarting position_ids."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        longest = kwargs.get("max_length_q")
        return cu, int(longest) if longest is not None else int((cu[1:] - cu[:-1]).max())
    length = query.shape[2]
    pos = kwargs.get("position_ids")
    starts = [0]
    if pos is not None and pos.shape[-1] == length:
        starts = torch.nonzero(pos.reshape(-1)[1:] != pos.reshape(-1)[:-1] + 1).flatten().add(1).tolist()
        starts = [0] + starts
    bounds = starts + [length]
    cu = torch.tensor(bounds, dtype=torch.int32, device=query.device)
    return cu, max(b - a for a, b in zip(bounds, bounds[1:]))


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The AttentionInterface function: (B, H, T, D) tensors -> ((B, T, H, D) output, None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    single = query.shape[0] == 1 and query.shape[2] == key.shape[2] and getattr(module, "is_causal", True)
    if kwargs.get("cu_seq_lens_q") is not None and not single:
        raise ValueError(f"a packed batch must be one row of full causal attention; got query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}")
    if attention_mask is not None or not single:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    for feature in ("softcap", "s_aux"):
        if kwargs.get(feature) is not None:
            raise UnsupportedError(f"packed attention has no {feature} (this model uses it); set train.packing=off")
    cu, longest = _segments(query, kwargs)
    window = kwargs.get("sliding_window")
    window = window if window and window < longest else None  # a window wider than every record changes nothing
    if _fast(query, dropout, window):
        if ONE_RECORD != "varlen" and cu.shape[0] == 2 and window is None:
            return _one_record(module, query, key, value, scaling)
        return varlen(query, key, value, cu, longest, scaling, window), None
    # the offsets as host ints where the batch brings them (data/pack.BOUNDS): no wait for the GPU per layer
    out = reference.packed_attention(query, key, value, kwargs.get(BOUNDS) or cu, scaling, dropout, window)
    return out.transpose(1, 2), None


def _one_record(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                scaling: float | None) -> tuple[torch.Tensor, None]:
    """A row of one record through SDPA, causal and unmasked: what its unpacked forward computes (ONE_RECORD)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    # cudnn: a preference, not a restriction (a shape cuDNN refuses takes the next backend)
    backends = sdpa_kernel(order, set_priority=True) if ONE_RECORD == "cudnn" else contextlib.nullcontext()
    with backends:
        return sdpa_attention_forward(module, query, key, value, None, scaling=scaling, is_causal=True)


def _mask(batch_size: int, q_length: int, kv_length: int, attention_mask: torch.Tensor | None = None,
          **kwargs: Any) -> torch.Tensor | None:
    """No mask for what attention() computes itself (one unpadded row); transformers' SDPA mask otherwise.
    A sliding-window layer's mask (local_size) is dropped too: attention() applies the window that the
    attention module passes as sliding_window (Llama-family modules, Qwen2/3 and Mistral all do)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and batch_size == 1 and q_length == kv_length and not kwargs.get("use_vmap"):
        return None
    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                     **kwargs)


@functools.cache
def register() -> str:
    """Make NAME a transformers attention implementation (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _text_config(base: torch.nn.Module) -> Any:
    """The language model's config (a multimodal config keeps it under get_text_config)."""
    return base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config


def unsupported(model: torch.nn.Module) -> str | None:
    """Why packed rows would not be exact for this model, or None when they are."""
    peft_cfg = getattr(model, "active_peft_config", None)
    if peft_cfg is not None and peft_cfg.is_prompt_learning:
        return f"{peft_cfg.peft_type.value.lower()} prepends virtual tokens to every row"
    base = _base(model)
    if not getattr(base, "_supports_attention_backend", False):
        return f"{type(base).__name__} does not route its attention through transformers' AttentionInterface"
    cfg = _text_config(base)
    for key in ("attn_logit_softcapping", "attention_chunk_size"):
        if getattr(cfg, key, None):
            return f"its config sets {key}, which packed attention does not implement"
    if any(isinstance(getattr(m, "sinks", None), torch.nn.Parameter) for m in base.modules()):  # gpt-oss
        return "its attention adds learned sinks (s_aux), which packed attention does not implement"
    return None


def enable(model: torch.nn.Module) -> None:
    """Switch the model (through a peft wrapper) to packed attention; disable() switches back. On a GPU whose
    varlen_attn has no enable_gqa, whether its kernel takes fewer key/value heads is checked once first."""
    global KERNEL_GQA
    if KERNEL_GQA is None and varlen_available() and "enable_gqa" not in _varlen_params():
        KERNEL_GQA = check_kernel_gqa()
    base = _base(model)
    if getattr(base, "_slimtune_attn_before", None) is None:
        base._slimtune_attn_before = base.config._attn_implementation
    base.set_attn_implementation(register())


def heads_note(model: torch.nn.Module) -> str:
    """How the varlen kernel gets a grouped-query model's key/value heads ("" where every query head has its own):
    as they are (enable_gqa, or check_kernel_gqa held on this GPU), or repeated per group."""
    cfg = _text_config(_base(model))
    heads, kv = getattr(cfg, "num_attention_heads", 0), getattr(cfg, "num_key_value_heads", None)
    if not heads or not kv or kv >= heads:
        return ""
    if "enable_gqa" in _varlen_params() or KERNEL_GQA:
        return f"; {kv} key/value heads for {heads} query heads, as they are"
    return f"; {kv} key/value heads repeated for {heads} query heads (this kernel did not take them as they are)"


def disable(model: torch.nn.Module) -> None:
    base = _base(model)
    before = getattr(base, "_slimtune_attn_before", None)
    if before is not None:
        base.set_attn_implementation(before)
        base._slimtune_attn_before = None


def enabled(model: torch.nn.Module) -> bool:
    return _base(model).config._attn_implementation == NAME
