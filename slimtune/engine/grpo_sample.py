"""GRPO's model passes: sampling G completions of each prompt with a KV cache (the training model, adapter on,
in eval mode so dropout does not reach the samples), the completion tokens' log-probabilities (with gradients
for the loss; without, for the old and reference ones); engine/grpo_memory.py predicts the memory of such a step.

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
from .completion_logps import completion_logps
from .decode import Sampling, StaticDecoder

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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


def cache_length(records: list[PromptRecord], g: GrpoConfig) -> int:
    """The tokens of a row of the static decoder's cache: the longest prompt + max_new_tokens."""
    return max((len(r.prompt_ids) for r in records), default=0) + g.max_new_tokens
