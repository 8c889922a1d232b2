"""Generation with the training template: batched (left padding, length-sorted), greedy by default.

Prompts are rendered exactly as in training (`data.render` with the generation prompt), so the model
sees at inference the text it was trained on, and decoding stops on the template's end tokens (the
EOS and, e.g., ChatML's <|im_end|>), not only on the tokenizer's EOS.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from ..data.collate import left_pad, pad_id
from ..data.encode import prompt_ids
from ..data.templates import render, stop_ids
from ..runs.metrics_log import progress
from .decode import whole_text

if TYPE_CHECKING:
    import argparse

    from transformers import PreTrainedTokenizerBase
    from transformers.generation.streamers import BaseStreamer


@dataclass
class Sampling:
    """Decoding settings; greedy unless do_sample."""
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0  # 1.0 = off; > 1 makes tokens already in the text less likely
    seed: int | None = None  # for sampling: the same seed gives the same answers

    @classmethod
    def from_flags(cls, args: argparse.Namespace) -> Sampling:
        """From chat's and generate's flags (the web app's Chat page reads its form as them)."""
        return cls(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                   top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


@dataclass
class Generated:
    texts: list[str]  # answers, in input order, without the stop token
    tokens: list[list[int]] = field(default_factory=list)  # new token ids, through the stop token if any
    stopped: list[bool] = field(default_factory=list)  # ended on a stop token (else max_new_tokens)
    seconds: float = 0.0
    truncated: int = 0  # prompts cut to their last max_len tokens

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def default_batch_size(device: str) -> int:
    # on a GPU decoding is bound by reading the weights once per step, so a large batch is almost free;
    # on a CPU the matmuls already use every core at batch 8
    return 64 if str(device).startswith("cuda") else 8


class RepetitionPenalty:
    """CTRL's repetition penalty (as transformers' RepetitionPenaltyLogitsProcessor: positive logits
    divided, negative ones multiplied) over the tokens of each row's own text only. transformers' version
    also penalizes the left padding, and the pad token is often the EOS: a padded row would then be
    pushed away from stopping and answer differently than the same prompt alone."""

    def __init__(self, penalty: float, prompt_mask: torch.Tensor):
        self.penalty, self.prompt_mask = penalty, prompt_mask.bool()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        grown = input_ids.shape[1] - self.prompt_mask.shape[1]
        valid = torch.cat([self.prompt_mask, self.prompt_mask.new_ones(input_ids.shape[0], grown)], dim=1)
        seen = torch.zeros_like(scores).scatter_add_(1, input_ids, valid.to(scores.dtype)) > 0
        penalized = torch.where(scores < 0, scores * self.penalty, scores / self.penalty)
        return torch.where(seen, penalized, scores)


def _decode_kwargs(s: Sampling) -> dict:
    # every setting explicit: a model's generation_config.json may ship its own top_k or
    # repetition_penalty (Qwen2.5's does), which would otherwise apply silently
    if not s.do_sample:
        return dict(do_sample=False, repetition_penalty=1.0)
    return dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, repetition_penalty=1.0)


def context_length(model: torch.nn.Module) -> int:
    """The longest sequence the model was built for (0: unknown)."""
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 0) or 0)


def _cut(prompts: list[list[int]], limit: int) -> int:
    """Keep each prompt's last `limit` tokens, in place: the end holds the question and the template's
    assistant header, which the answer follows. A 1 MB prompt uncut asked for 1.1 TB of attention scores.
    Returns how many were cut."""
    cut = 0
    for k, ids in enumerate(prompts):
        if limit and len(ids) > limit:
            prompts[k], cut = ids[-limit:], cut + 1
    return cut


def _prompt_learning(model: torch.nn.Module, batch: dict) -> tuple:
    """(model, inputs) for generate. A prompt method's learned tokens go to the base model as training
    placed them: right before each prompt, after its left padding, so that the prompt's positions are
    those of training (peft puts them before the padding: a padded row's answer then differs from the
    same prompt alone). prefix_tuning's keys/values go in as a filled KV cache: peft hands them to
    generate as `past_key_values`, which transformers 5.24 drops beside the empty `cache` it makes
    itself, and the answers were the base model's (first-step logits 5e-5 from the base, 11.8 from
    the prefixed forward). Other models are returned as they are."""
    pcfg = getattr(model, "active_peft_config", None)
    if not getattr(pcfg, "is_prompt_learning", False):
        return model, batch
    base, ids, mask = model.get_base_model(), batch["input_ids"], batch["attention_mask"]
    wide = torch.cat([mask.new_ones(ids.shape[0], pcfg.num_virtual_tokens), mask], dim=1)
    if pcfg.peft_type.value == "PREFIX_TUNING":  # the prefix keys carry no rotary position: order is free
        # the keyword is `cache` from transformers 5.24 on, `past_key_values` before it
        key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        return base, dict(batch, attention_mask=wide, **{key: model.get_prompt(ids.shape[0])})
    embeds = base.get_input_embeddings()(ids)
    embeds = torch.cat([model.get_prompt(ids.shape[0]).to(embeds.dtype), embeds], dim=1)
    order = torch.sort(wide, dim=1, stable=True).indices  # padding first, then virtual tokens, then prompt
    embeds = embeds.gather(1, order[..., None].expand_as(embeds))
    return base, dict(batch, inputs_embeds=embeds, attention_mask=wide.gather(1, order))


def _finish(row: list[int], stops: list[int]) -> tuple[list[int], bool]:
    """The row's new tokens through its first stop token (what follows is padding of a finished row)."""
    cut = next((k for k, t in enumerate(row) if t in stops), None)
    return (row, False) if cut is None else (row[:cut + 1], True)


def _batch(model: torch.nn.Module, batch: dict, s: Sampling, pad: int, stops: list[int],
           streamer: BaseStreamer | None) -> list[list[int]]:
    """One generate call: each row's new token ids (through max_new_tokens, padding included)."""
    from transformers import LogitsProcessorList

    procs = LogitsProcessorList()
    if s.repetition_penalty != 1.0:
        procs.append(RepetitionPenalty(s.repetition_penalty, batch["attention_mask"]))
    target, inputs = _prompt_learning(model, batch)
    gen = target.generate(**inputs, max_new_tokens=s.max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                          use_cache=True, logits_processor=procs, streamer=streamer, **_decode_kwargs(s))
    return gen[:, batch["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def answer_all(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, template: str,
               conversations: list[list[dict]], sampling: Sampling | None = None, batch_size: int | None = None,
               device: str = "cpu", streamer: BaseStreamer | None = None, max_len: int = 0,
               show_progress: bool = False) -> Generated:
    """Answers for conversations that end with a user turn, in input order, with token counts and time.
    A streamer (decode.printer or decode.queue) needs batch_size 1. An answer cut at max_new_tokens inside a
    character ends before that character (decode.whole_text).

    Args:
        max_len: prompts longer than this keep their last max_len tokens (0: the model's context length
            less max_new_tokens); out.truncated counts them.
        show_progress: a bar on stderr with records done, new tokens/s and the time left.
    """
    s = sampling or Sampling()
    batch_size = batch_size or default_batch_size(device)
    prompts = [prompt_ids(render(template, c, tokenizer, add_generation_prompt=True), tokenizer)
               for c in conversations]
    truncated = _cut(prompts, max_len or max(context_length(model) - s.max_new_tokens, 0))
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out = Generated([""] * len(prompts), [[] for _ in prompts], [False] * len(prompts), truncated=truncated)
    pad, stops = pad_id(tokenizer), stop_ids(template, tokenizer)
    was_training = model.training
    model.eval()
    if s.seed is not None:
        torch.manual_seed(s.seed)
    start = time.perf_counter()
    with progress(len(prompts), show_progress, desc="generate", unit="record") as bar:
        for b in range(0, len(order), batch_size):
            idx = order[b:b + batch_size]
            batch = {k: v.to(device) for k, v in left_pad([prompts[i] for i in idx], pad).items()}
            for row, i in zip(_batch(model, batch, s, pad, stops, streamer), idx):
                out.tokens[i], out.stopped[i] = _finish(row, stops)
                answer = out.tokens[i][:-1] if out.stopped[i] else out.tokens[i]
                out.texts[i] = whole_text(tokenizer, answer, skip_special_tokens=True).strip()
            bar.set_postfix(tok_s=f"{out.new_tokens / max(time.perf_counter() - start, 1e-9):.1f}", refresh=False)
            bar.update(len(idx))
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    out.seconds = time.perf_counter() - start
    model.train(was_training)
    return out


def generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, template: str,
             conversations: list[list[dict]], max_new_tokens: int = 128, batch_size: int = 8, do_sample: bool = False,
             temperature: float = 1.0, top_p: float = 1.0, device: str = "cpu", **sampling: Any) -> list[str]:
    """Answers for conversations that end with a user turn, in input order (see `answer_all` for timings)."""
    s = Sampling(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                 **sampling)
    return answer_all(model, tokenizer, template, conversations, s, batch_size, device).texts
