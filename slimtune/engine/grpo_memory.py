"""The memory a GRPO step is predicted to need, from the config, the run plan and the prompts' lengths.

The training pass is any micro-batch to engine/memory.py's estimator, the one SFT and DPO are predicted with:
the frozen weights, the trainable parameters, their gradients and AdamW state, and the activations saved with the
plan's checkpointing, offload and fast paths, over the rows GRPO trains: each prompt of the worst micro-batch
(the train.micro_batch_size longest prompts) num_generations times, each row its prompt + max_new_tokens tokens.
Packed rows count those tokens, an upper bound (a completion that stops early holds fewer; a micro-batch of the
stream's shuffle holds prompts no longer than the longest); padded rows count every row at the longest row's width.
The completions' log-probabilities take the output head a chunk of rows at a time (engine/completion_logps.py)
whatever the plan's loss, so their logits are one chunk's.

Beside it, GRPO's own: the KV cache of sampling the micro-batch's completions (grpo.decode=compiled keeps it
through the step, at the length the decoder rounds up to; transformers' generate frees it before the training
pass), the prefill's transient beside it, and the no-grad passes (the reference with the adapter off when
grpo.beta > 0, the old log-probabilities when grpo.steps_per_generation > 1), which keep nothing for backward:
the residual stream and one layer's intermediates at a time, and a chunk of logits. The peak is the largest of
the three moments (sampling, no-grad passes, training pass) on top of the weights, trainable parameters and AdamW
state."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..config import Config
from ..kernels import linear_ce
from ..data.prompts import PromptRecord
from . import decode, memory, moe_memory
from .grpo_sample import cache_length
from .memory import BYTES, GIB, Estimate

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from .run_plan import RunPlan

# a no-grad forward over T tokens holds the residual stream, its normed copy, attention's q, k, v and output
# (together about 4 x hidden) and one MLP's gate, up and their product (3 x intermediate), in the compute dtype:
# counted from a Llama layer's shapes, not measured
NO_GRAD_HIDDEN, NO_GRAD_INTER = 4, 3


@dataclass(frozen=True)
class GrpoEstimate:
    """A GRPO step's predicted memory, in bytes, by part (est["peak"] reads as a dict's view)."""
    train: Estimate  # memory.estimate of the training pass: weights, trainable, gradients, AdamW, activations
    kv_cache: float  # sampling's KV cache of the micro-batch's completions
    sampling: float  # the prefill's transient beside the cache
    no_grad: float  # a no-grad pass's transient (reference, old log-probs); 0 when neither runs
    kept: bool  # the cache stays allocated through the training pass (grpo.decode=compiled)
    rows: int  # completions sampled and trained per micro-batch (per process)
    prompt_len: int  # the longest prompt
    tokens: int  # tokens of the training pass, as the plan's rows hold them
    packed: bool

    @property
    def weights(self) -> float:
        """The frozen base and the trainable parameters."""
        return self.train.weights + self.train.trainable

    @property
    def optimizer(self) -> float:
        return self.train.optimizer

    @property
    def train_pass(self) -> float:
        """What the training pass holds beyond weights and AdamW state: activations, logits, gradients (and the
        AdamW step's temporaries), at its larger moment."""
        return self.train.peak_allocated - self.train.persistent

    @property
    def peak_allocated(self) -> float:
        kept = self.kv_cache if self.kept else 0.0
        moments = (self.kv_cache + self.sampling, kept + self.no_grad, kept + self.train_pass)
        return self.train.persistent + max(moments)

    @property
    def peak(self) -> float:
        """Predicted peak reserved by PyTorch (allocated + the estimator's allocator slack), no CUDA context."""
        return self.peak_allocated + self.train.allocator

    def __getitem__(self, key: str) -> float | bool | int:
        return getattr(self, key)


def worst_prompts(lengths: list[int], micro_batch_size: int) -> list[int]:
    """The prompt lengths of the worst micro-batch: the micro_batch_size longest."""
    return sorted(lengths, reverse=True)[:micro_batch_size]


def estimate(cfg: Config, plan: RunPlan, mcfg: PretrainedConfig, prompts: list[int], kept: bool,
             cache_len: int = 0) -> GrpoEstimate:
    """A GRPO step of `cfg` under `plan` for the micro-batch of these prompt lengths (G completions each), on the
    model of transformers config `mcfg`. kept: the compiled decoder keeps its cache (cache_len tokens a row, rounded
    up as the decoder does; default the micro-batch's longest prompt + max_new_tokens)."""
    g, world = cfg.grpo, plan.world_size
    new = g.max_new_tokens
    rows = [(p + new, new) for p in prompts for _ in range(g.num_generations)]
    packed = plan.kernels.packing != "off"
    # the rows are already the sequences (no pair doubling); a GRPO micro-batch packs into one row, never bins
    tc = replace(cfg.train, objective="sft", micro_batch_size=len(rows), packing="rows" if packed else "off")
    # memory.estimate builds a meta model, whose init draws from the CPU RNG: forked, so a run's training RNG
    # (dropout) is the same whether or not an earlier estimate built it (estimates cache their meta model)
    with torch.random.fork_rng(devices=[]):
        train = memory.estimate(replace(cfg, train=tc), rows, world, mcfg, plan.kernels, plan.precision)
    vocab, h = mcfg.vocab_size, mcfg.hidden_size
    chunk = linear_ce.chunk_rows(vocab)
    if not memory.fast_engine(replace(cfg, train=tc), plan.kernels):
        train = replace(train, logits=train.logits * min(1.0, chunk / max(len(rows) * new, 1)))
    longest = max(prompts, default=0)
    mine = len(rows) // max(world, 1)  # each process samples and trains whole groups of its share of prompts
    width = BYTES.get(plan.precision.autocast or plan.precision.weights, 2)
    length = -(-max(cache_len, longest + new) // decode.LENGTH_STEP) * decode.LENGTH_STEP if kept else longest + new
    kv = _kv_per_token(mcfg, width) * mine * length
    inter = moe_memory.ffn_width(mcfg)
    forward = NO_GRAD_HIDDEN * h + NO_GRAD_INTER * inter
    sampling = mine * longest * forward * width + 2 * mine * vocab * 4  # prefill; a step's fp32 logits
    tokens = sum(n for n, _ in rows) if packed else len(rows) * (longest + new)
    no_grad = 0.0
    if g.beta > 0 or g.steps_per_generation > 1:
        no_grad = tokens / max(world, 1) * forward * width + min(chunk, mine * new) * vocab * memory.FAST_LOGIT_BYTES
    return GrpoEstimate(train, kv, sampling, no_grad, kept, mine, longest, int(tokens), packed)


def _kv_per_token(mcfg: PretrainedConfig, width: int) -> int:
    """K and V bytes of one token in every layer."""
    heads = getattr(mcfg, "num_attention_heads", None) or 1
    kv_heads = getattr(mcfg, "num_key_value_heads", None) or heads
    head_dim = getattr(mcfg, "head_dim", None) or mcfg.hidden_size // heads
    return 2 * mcfg.num_hidden_layers * kv_heads * head_dim * width


def predict(model_config: PretrainedConfig, plan: RunPlan, records: list[PromptRecord], cfg: Config,
            kept: bool) -> tuple[GrpoEstimate, str]:
    """(the estimate of a step over the worst micro-batch of `records`, the line the run logs when it starts), the
    compiled decoder's cache sized as the run sizes it: the longest prompt of all + max_new_tokens."""
    lengths = [len(r.prompt_ids) for r in records]
    est = estimate(cfg, plan, model_config, worst_prompts(lengths, cfg.train.micro_batch_size), kept,
                   cache_length(records, cfg.grpo))
    return est, line(est, cfg.grpo.max_new_tokens)


def line(est: GrpoEstimate, g_new: int) -> str:
    """The estimate as the run's log prints it."""
    how = "packed rows, the longest prompts" if est.packed else "padded rows"
    return (f"grpo memory estimate: weights {est.weights / GIB:.2f} GiB; optimizer state (AdamW) "
            f"{est.optimizer / GIB:.2f} GiB; sampling {est.rows} completions of up to {est.prompt_len}+{g_new} "
            f"tokens: KV cache {est.kv_cache / GIB:.2f} GiB{' (kept between steps)' if est.kept else ''}; training "
            f"pass over them ({est.tokens} tokens, {how}) {est.train_pass / GIB:.2f} GiB; peak about "
            f"{est.peak_allocated / GIB:.2f} GiB allocated, {est.peak / GIB:.2f} GiB reserved")
