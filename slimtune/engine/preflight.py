"""What a run knows before its model loads: the training records read as train.objective reads them (answers for
sft, pairs or unpaired records for dpo | ipo | simpo | orpo | kto, prompts for grpo), their sizes, and the memory
the run plan's worst micro-batch is predicted to need (grpo: its sampling and training pass). `slimtune train`,
`slimtune estimate`, the web app and the bench scripts call these same functions, so the prediction printed before
a run is the one the run makes."""
from __future__ import annotations

import types
from typing import TYPE_CHECKING, Callable

import torch
from transformers import AutoModelForCausalLM

from .. import methods
from ..config import Config
from ..config.fields import GrpoConfig
from ..data import Built, build
from ..data.pairs import BuiltPairs, EncodedPair
from ..data.preference import build_pairs
from ..data.prompts import PromptRecord, build_prompts
from ..models import DTYPES, load_config
from ..objectives.rewards import NEEDS_ANSWER, builtins
from . import decode, grpo_memory, memory, precision, preference_step
from .memory import Estimate
from .run_plan import RunPlan
from .split import Sizes

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Log = Callable[[str], None]
Records = Built | BuiltPairs | types.SimpleNamespace


def answers_needed(g: GrpoConfig) -> bool:
    """Whether a built-in reward of grpo.rewards compares with the reference answer, which every prompt must then
    have (rewards given with --reward read what a record has)."""
    return any(r.name in NEEDS_ANSWER for r in builtins(g))


def records(cfg: Config, tokenizer: PreTrainedTokenizerBase, log: Log = print, needs_answer: bool = False) -> Records:
    """data.train (and data.eval) read, split and encoded as train.objective trains on them, every record checked
    (a bad one stops here with its file, record and field). needs_answer: grpo's prompts must carry an answer."""
    if cfg.train.objective == "grpo":
        return prompts(cfg, tokenizer, needs_answer, log)
    if cfg.train.objective != "sft":
        return build_pairs(cfg, tokenizer, log)
    return build(cfg.data, tokenizer, log)


def prompts(cfg: Config, tokenizer: PreTrainedTokenizerBase, needs_answer: bool, log: Log) -> types.SimpleNamespace:
    """GRPO's prompts of data.train (held-out evaluation is not run for grpo: data.eval is not read)."""
    if cfg.data.eval:
        log(f"grpo: data.eval ({cfg.data.eval}) is not read; grpo runs no held-out evaluation")
    built = build_prompts(cfg.data, tokenizer, needs_answer, log)
    return types.SimpleNamespace(train=built.train, eval=[], skipped=built.skipped, max_new=cfg.grpo.max_new_tokens)


def sizes(built: Records) -> Sizes:
    """(length, trained tokens) of every training record, longest first: the worst micro-batches."""
    if built.train and isinstance(built.train[0], EncodedPair):  # two rows each: engine/memory.py counts both
        return preference_step.sizes(built.train)
    if built.train and isinstance(built.train[0], PromptRecord):  # GRPO: a prompt and its longest completion
        return sorted(((len(r.prompt_ids) + built.max_new, built.max_new) for r in built.train), reverse=True)
    return sorted(((len(e.input_ids), sum(x != -100 for x in e.labels)) for e in built.train), reverse=True)


def predict(cfg: Config, plan: RunPlan, sizes: Sizes | None) -> Estimate:
    """The memory estimate (per GPU) of the plan's worst micro-batch, its longest records (None: micro-batches of
    data.max_len tokens): what train prints before the model loads and `slimtune estimate` shows by part."""
    rows = sizes[:plan.micro_batch_size] if sizes else None
    return memory.estimate(plan.apply(cfg), rows, plan.world_size, kernels=plan.kernels, dtypes=plan.precision)


def meta_model(cfg: Config, plan: RunPlan) -> torch.nn.Module:
    """The model as train loads and prepares it (base in the plan's dtype, the method applied, trainable weights
    cast), built on the meta device: its shapes and dtypes without its memory. A qlora base counts as unquantized
    (bitsandbytes quantizes while loading, on the GPU)."""
    name = precision.base_dtype_name(cfg, plan.device, plan.precision)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(cfg.model.path, cfg.model.trust_remote_code),
                                                 dtype=DTYPES[name], trust_remote_code=cfg.model.trust_remote_code)
    model = methods.apply(model, cfg.method)
    precision.cast_trainable(model, plan.precision.trainable)
    return model


def grpo_predict(model: torch.nn.Module, plan: RunPlan, records: list[PromptRecord],
                 cfg: Config) -> tuple[grpo_memory.GrpoEstimate, str]:
    """(grpo_memory's estimate of a step, the line the run logs when it starts) for `model` (loaded, or meta_model)
    under `plan` (cfg: the plan applied): the training pass over the worst micro-batch's G completions of each
    prompt as engine/memory.py counts any micro-batch, beside sampling's KV cache and the no-grad passes."""
    kept = decode.resolve(cfg.grpo.decode, plan.device) == "compiled" and decode.supports(model) is None
    return grpo_memory.predict(model.config, plan, records, cfg, kept)


def grpo_verdict(est: grpo_memory.GrpoEstimate, budget: float) -> tuple[bool, str]:
    """(whether GRPO's predicted peak with the CUDA context fits `budget` bytes, the line that says so)."""
    total = est.peak + memory.CUDA_CONTEXT
    fits = total <= budget
    return fits, (f"budget {budget / memory.GIB:.1f} GiB: predicted {total / memory.GIB:.2f} GiB with the CUDA "
                  f"context: {'fits' if fits else 'does NOT fit'}")


def worst_prompt(cfg: Config) -> list[PromptRecord]:
    """Without data: a micro-batch of prompts of data.max_len tokens, the longest a GRPO prompt may be."""
    return [PromptRecord([0] * cfg.data.max_len, "", None, "data.max_len")] * cfg.train.micro_batch_size
