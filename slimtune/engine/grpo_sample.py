"""GRPO's model passes: sampling G completions of each prompt with a KV cache (the training model, adapter on,
in eval mode so dropout does not reach the samples), the completion tokens' log-probabilities (with gradients
for the loss; without, for the old and reference ones), and the memory such a step needs.

Sampling is seeded per (train.seed, generation, micro-batch) in a forked RNG, so the completions of a step
depend on nothing else: a resumed run samples what the uninterrupted one did, and the training RNG (dropout)
is not moved by generating."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from transformers import GenerationConfig

from ..config import ConfigError
from ..config.fields import GrpoConfig
from ..data.prompts import PromptRecord
from ..kernels.linear_ce import CHUNK_BYTES
from .completion_logps import completion_logps
from .decode import Sampling, StaticDecoder
from .memory import LAYER_COEF

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

GIB = 2 ** 30


def sample_seed(seed: int, generation: int, micro: int) -> int:
    """The sampling seed of one micro-batch of one generation: a function of nothing but these three."""
    return (seed * 1_000_003 + generation * 10_007 + micro) % 2 ** 63


def left_pad(rows: list[list[int]], pad: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of rows padded on the left, as generation continues every row at the right end."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def completion_mask(completions: torch.Tensor, stops: list[int]) -> torch.Tensor:
    """1 for each completion token up to and including its first stop token, 0 after it."""
    is_stop = torch.isin(completions, torch.tensor(stops, device=completions.device))
    after = (is_stop.cumsum(dim=1) - is_stop.long()) > 0  # tokens after the first stop
    return (~after).long()


@torch.no_grad()
def sample(model: torch.nn.Module, records: list[PromptRecord], g: GrpoConfig, pad: int, stops: list[int],
           device: str, seed: int, context: Callable = contextlib.nullcontext,
           decoder: StaticDecoder | None = None) -> dict[str, torch.Tensor]:
    """G completions of each record (rows ordered record by record): prompt ids and mask (left-padded),
    completion ids and mask. With a `decoder` (grpo.decode=compiled) its static cache and compiled step draw
    them, else transformers' generate: the same tokens under one seed."""
    prompt_ids, prompt_mask = left_pad([r.prompt_ids for r in records for _ in range(g.num_generations)], pad,
                                       device)
    was = model.training
    model.eval()
    devices = [torch.device(device).index or 0] if device.startswith("cuda") else []
    try:
        with torch.random.fork_rng(devices=devices), context():
            torch.manual_seed(seed)
            completions = _draw(model, prompt_ids, prompt_mask, g, pad, stops, decoder)
    finally:
        model.train(was)
    if completions.shape[1] == 0:  # every row stopped at once: keep one token (the stop) per row
        completions = torch.full((len(completions), 1), stops[0], device=completions.device)
    mask = completion_mask(completions, stops)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask,
            "completion_ids": completions.masked_fill(mask == 0, pad), "completion_mask": mask}


def _draw(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, g: GrpoConfig, pad: int, stops: list[int],
          decoder: StaticDecoder | None) -> torch.Tensor:
    if decoder is not None:
        return decoder.generate(ids, mask, Sampling(g.temperature, g.top_p, g.max_new_tokens, tuple(stops), pad))
    gen = GenerationConfig(do_sample=True, temperature=g.temperature, top_p=g.top_p, top_k=0,
                           max_new_tokens=g.max_new_tokens, eos_token_id=stops, pad_token_id=pad, use_cache=True)
    with own_settings_only(model):
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, ids.shape[1]:]


@contextlib.contextmanager
def own_settings_only(model: torch.nn.Module) -> Iterator[None]:
    """model.generate draws with the settings of the GenerationConfig it is passed and nothing of the model's own:
    transformers fills every setting the passed config leaves None from the model's generation_config (its
    generation_config.json: repetition_penalty, top_k, min_p, no_repeat_ngram_size, suppress_tokens...), which
    would draw from another distribution than the one GRPO's log-probabilities and the static decoder take. Every
    module holding a generation_config (the transformers model inside an adapter's wrapper) holds a bare one, with
    only its start token ids, inside the block, and its own again after it, even on an error."""
    owners = [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    kept = [m.generation_config for m in owners]
    try:
        for m, c in zip(owners, kept):
            m.generation_config = GenerationConfig(bos_token_id=c.bos_token_id,
                                                   decoder_start_token_id=c.decoder_start_token_id)
        yield
    finally:
        for m, c in zip(owners, kept):
            m.generation_config = c


@torch.no_grad()
def reference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor], temperature: float,
                    context: Callable = contextlib.nullcontext, packed: bool = False) -> torch.Tensor:
    """The completion log-probabilities of the model with its adapter switched off (the reference), eval mode;
    packed as the training pass is."""
    was = model.training
    model.eval()
    try:
        with model.disable_adapter(), context():
            return completion_logps(model, batch, temperature, packed=packed)
    finally:
        model.train(was)


def check_reference(model: torch.nn.Module, g: GrpoConfig) -> None:
    """grpo.beta > 0 takes the reference as the model with its adapter off: a model without one has none."""
    if g.beta > 0 and not hasattr(model, "disable_adapter"):
        raise ConfigError(f"grpo.beta={g.beta:g}: the KL reference is the model with its adapter switched off, and "
                          f"{type(model).__name__} has no adapter to switch off; use an adapter method (lora...) or "
                          "grpo.beta=0")


def stop_ids(tokenizer: PreTrainedTokenizerBase, template_stops: list[int]) -> list[int]:
    """The ids that end a completion: the template's end-of-turn tokens and the tokenizer's EOS."""
    ids = list(dict.fromkeys([*template_stops, *([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                                                  else [])]))
    if not ids:
        raise ConfigError("grpo: the tokenizer has no EOS token and the template no end-of-turn token, so a "
                          "completion never ends; set the tokenizer's eos_token")
    return ids


def step_shape(records: list[PromptRecord], micro_batch_size: int, g: GrpoConfig) -> tuple[int, int]:
    """(the longest prompt's tokens, completions sampled per micro-batch): the sizes estimate() is given."""
    return max(len(r.prompt_ids) for r in records), micro_batch_size * g.num_generations


def estimate(model: torch.nn.Module, prompt_len: int, rows: int, g: GrpoConfig, method: str = "lora",
             kept: bool = False) -> dict:
    """Bytes a GRPO step needs beside the weights, for `rows` sequences of prompt_len + max_new_tokens tokens:
    the KV cache of sampling, the saved activations of the training forward and a chunk of its fp32 logits (with
    their log-softmax and gradient), each for one micro-batch of completions. kept: the cache stays allocated
    through the training pass (grpo.decode=compiled), so the peak holds both."""
    mc = model.config if hasattr(model, "config") else None

    def get(key: str, default: int = 0) -> int:
        return getattr(mc, key, None) or default
    layers, hidden = get("num_hidden_layers"), get("hidden_size")
    heads = get("num_attention_heads", 1)
    kv_heads, head_dim = get("num_key_value_heads", heads), get("head_dim", hidden // max(heads, 1))
    width = max(p.element_size() for p in model.parameters())
    # sampling's cache holds every row padded to this; a packed training pass holds only the real tokens, so its
    # activations counted at this width are an upper bound (the longest prompt, every completion max_new_tokens)
    tokens = rows * (prompt_len + g.max_new_tokens)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    kv = 2 * layers * kv_heads * head_dim * width * tokens
    coef = LAYER_COEF.get(method, LAYER_COEF["lora"])
    activations = int(coef * tokens * layers * (hidden + get("intermediate_size", 4 * hidden)))
    # fp32 logits with their log-softmax and gradient, a chunk of rows at a time (engine/completion_logps.py)
    logits = 3 * min(4 * rows * (g.max_new_tokens + 1) * get("vocab_size"), CHUNK_BYTES)
    return {"weights": weights, "kv_cache": kv, "train_pass": activations + logits,
            "peak": weights + (kv + activations + logits if kept else max(kv, activations + logits)), "kept": kept}


def estimate_line(est: dict, rows: int, prompt_len: int, g: GrpoConfig) -> str:
    """The estimate as the run's log prints it."""
    return (f"grpo memory estimate: weights {est['weights'] / GIB:.2f} GiB; sampling {rows} completions of up to "
            f"{prompt_len}+{g.max_new_tokens} tokens: KV cache {est['kv_cache'] / GIB:.2f} GiB"
            f"{' (kept between steps)' if est.get('kept') else ''}; training pass over "
            f"them {est['train_pass'] / GIB:.2f} GiB; peak about {est['peak'] / GIB:.2f} GiB (optimizer state "
            "not counted)")
