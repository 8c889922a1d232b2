"""Batched sampling with a pre-allocated KV cache and a compiled one-token step (grpo.decode=compiled).

transformers' generate grows a DynamicCache by concatenation and runs every decode step as hundreds of small
kernels launched from Python: on a GPU the step is paced by the CPU, and GRPO's sampling outlasts its training
pass (a 0.5B model's shape, 16 rows, H200: 60 ms a decode step through generate, 4.4 ms here; bench/grpo_decode.py
gives 7.7 s against 0.6 s of sampling beside 0.12-0.15 s of training a step). Here the cache is a transformers
StaticCache, allocated once for rows x (prompt + max_new_tokens) and kept between calls while the batch fits it
(CUDA graphs read its fixed addresses), the prefill runs eagerly, and the one-token step is torch.compile'd (mode
reduce-overhead: CUDA graphs on the GPU).

The adapter's weights change at every optimizer step: the compiled step takes parameters as graph inputs and
CUDA graphs read them where they live (the optimizer updates them in place), so each call samples from the
current weights; a test changes a LoRA weight between two calls and checks the tokens follow it.

The sampling arithmetic is transformers' own (its temperature and top-p warpers, softmax, one multinomial draw of
every row per step, finished rows fed the pad token), so under one seed the tokens are those generate draws. The
rows' end is read from the device every CHECK_EVERY steps instead of every step (each read stalls the CPU until
the GPU catches up); steps past the last row's stop are cut off, so the completions are the same.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import StaticCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper
from transformers.masking_utils import create_masks_for_generate

from .loss import sharded

CHECK_EVERY = 8  # decode steps between reads of "every row has stopped" (a device sync each)
BACKEND = "inductor"  # tests on the CPU pass "eager" or a counting backend: the same graph, no code generation
LENGTH_STEP = 64  # cache lengths are rounded up to this: a prompt longer than the run's hint costs few compiles


def resolve(mode: str, device: str) -> str:
    """grpo.decode as it runs: auto is compiled on CUDA and eager elsewhere."""
    if mode == "auto":
        return "compiled" if str(device).startswith("cuda") else "eager"
    return mode


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_new_tokens: int
    stops: tuple[int, ...]
    pad: int
    greedy: bool = False  # argmax instead of a draw (equivalence tests)


def make(model: torch.nn.Module, mode: str, device: str, length: int,
         log: Callable[[str], None] = print) -> StaticDecoder | None:
    """The decoder grpo.decode asks for on `device` (None: transformers' generate), its cache sized for
    `length` tokens a row (the longest prompt + max_new_tokens) so one compiled graph serves the whole run."""
    if resolve(mode, device) != "compiled":
        return None
    why = supports(model)
    if why is not None:
        log(f"grpo.decode={mode}: sampling runs transformers' generate: {why}")
        return None
    graphs = "CUDA graphs" if str(device).startswith("cuda") else "no CUDA graphs off the GPU"
    log(f"grpo.decode={mode}: sampling with a static KV cache of {length} tokens a row and the one-token step "
        f"through torch.compile ({graphs}); the first generation waits for the compile")
    return StaticDecoder(model, length=length, log=log)


def supports(model: torch.nn.Module) -> str | None:
    """Why the static-cache decoder cannot run `model` (None when it can): prompt-learning adapters put their
    virtual tokens in the cache themselves, and transformers marks the models whose forward compiles whole
    with a static cache (_can_compile_fullgraph, the test its own generate uses before compiling)."""
    if sharded(model):
        return ("FSDP2 shards it, and every process must take each decoding step together (generate's "
                "synced_gpus)")
    config = getattr(model, "active_peft_config", None)
    if config is not None and getattr(config, "is_prompt_learning", False):
        return f"{type(config).__name__} keeps its virtual tokens in the KV cache"
    base = _base(model)
    if not getattr(base, "_can_compile_fullgraph", False):
        return f"{type(base).__name__} is not marked by transformers as compiling with a static KV cache"
    return None


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model that holds the (LoRA) layers: called directly, past peft's forward wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class StaticDecoder:
    """The static KV cache and the compiled one-token step of one model, kept across calls."""

    def __init__(self, model: torch.nn.Module, length: int = 0, compiled: bool = True,
                 backend: str | Callable | None = None, log: Callable[[str], None] = print) -> None:
        self.model, self.base, self.log, self.length = model, _base(model), log, length
        self.caches: dict[int, tuple[int, Any]] = {}  # rows -> (length, StaticCache): a smaller last micro-batch
        # keeps its own, so going back to full ones finds their buffers where the CUDA graphs recorded them
        params = inspect.signature(self.base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x renamed it
        self.keep = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.failed: str | None = None
        self.step = self._forward
        if compiled:
            backend = backend or BACKEND
            mode = "reduce-overhead" if backend == "inductor" else None  # CUDA graphs (none for CPU tensors)
            self.step = torch.compile(self._forward, backend=backend, mode=mode, dynamic=False)
        self.compiled = compiled

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: Any, cache: Any) -> torch.Tensor:
        out = self.base(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{self.cache_kw: cache}, **self.keep)
        return out.logits[:, -1]

    def _reserve(self, rows: int, length: int) -> tuple[int, Any]:
        """(length, cache) of `rows`: the kept one, reset, when it holds `length` tokens; a new one (rounded up)
        otherwise."""
        length = -(-max(length, self.length) // LENGTH_STEP) * LENGTH_STEP
        held = self.caches.get(rows)
        if held is not None and held[0] >= length:
            held[1].reset()
            return held
        self.caches.pop(rows, None)  # the old buffers go before the new ones are allocated
        self.caches[rows] = (length, StaticCache(config=self.base.config, max_cache_len=length))
        return self.caches[rows]

    def _mask(self, mask2d: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, cache: Any) -> Any:
        """The 4D mask of this step, made outside the compiled step as transformers' generate makes it."""
        make = getattr(self.base, "create_masks_for_generate", create_masks_for_generate)
        embeds = torch.empty((ids.shape[0], ids.shape[1], 0), dtype=self.base.dtype, device=ids.device)
        return make(config=self.base.config, inputs_embeds=embeds, attention_mask=mask2d, position_ids=positions,
                    **{self.cache_kw: cache})

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, s: Sampling) -> torch.Tensor:
        """Completion ids [rows, steps] of left-padded prompts; rows that stopped carry the pad token."""
        rows, width = ids.shape
        length, cache = self._reserve(rows, width + s.max_new_tokens)
        full = torch.cat([mask, mask.new_ones(rows, length - width)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(ids, positions, self._mask(full, ids, positions, cache), cache)
        out = torch.full((rows, s.max_new_tokens), s.pad, dtype=torch.long, device=ids.device)
        stops = torch.tensor(s.stops, device=ids.device)
        running = torch.ones(rows, dtype=torch.long, device=ids.device)
        pos = positions[:, -1:]
        pick = _picker(s)
        steps = 0
        for t in range(s.max_new_tokens):
            token = pick(logits) * running + s.pad * (1 - running)
            out[:, t] = token
            running = running & ~torch.isin(token, stops)
            steps = t + 1
            if steps == s.max_new_tokens or (steps % CHECK_EVERY == 0 and not bool(running.any())):
                break
            pos = pos + 1
            logits = self._decode(token[:, None], pos, full, cache)
        return _trim(out[:, :steps], stops)

    def _decode(self, token: torch.Tensor, pos: torch.Tensor, full: torch.Tensor, cache: Any) -> torch.Tensor:
        mask = self._mask(full, token, pos, cache)
        if self.failed is None and self.compiled:
            try:
                if token.is_cuda:
                    torch.compiler.cudagraph_mark_step_begin()
                return self.step(token, pos, mask, cache).clone()
            except torch._dynamo.exc.TorchDynamoException as err:
                inner = getattr(err, "inner_exception", None) or err
                first = str(inner).strip().splitlines()[0][:300] if str(inner).strip() else ""
                self.failed = f"{type(inner).__name__}: {first}"
                self.log(f"fast path off: grpo.decode=compiled: torch.compile failed on the decode step "
                         f"({self.failed}); sampling runs the step eagerly (set grpo.decode=eager to skip it)")
        return self._forward(token, pos, mask, cache)


def _picker(s: Sampling) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits [rows, vocab] -> the next token of each row, as transformers' sampling draws it."""
    warpers = []
    if s.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(s.temperature))
    if s.top_p < 1.0:
        warpers.append(TopPLogitsWarper(s.top_p))

    def pick(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.to(dtype=torch.float32)
        if s.greedy:
            return scores.argmax(dim=-1)
        for warp in warpers:
            scores = warp(None, scores)
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return pick


def _trim(out: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """Columns up to the last row's first stop (all of them while a row has not stopped): generate's width."""
    is_stop = torch.isin(out, stops)
    if not bool(is_stop.any(dim=1).all()):
        return out
    first = is_stop.long().argmax(dim=1)
    return out[:, :int(first.max()) + 1]
