"""GRPO's memory estimate (engine/grpo_memory.py): the training pass is engine/memory.py's estimate of the step's
completion rows, beside sampling's KV cache, the no-grad passes and the AdamW state; the parts add up to the peak,
grow with G and max_new_tokens as the formula says, and bench/grpo_speed.py's configuration is pinned."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from slimtune import load_config
from slimtune.config import Config
from slimtune.data.prompts import PromptRecord
from slimtune.engine import decode, grpo_memory, memory, run_plan
from slimtune.engine.run_plan import RunPlan
from slimtune.kernels import linear_ce
from slimtune.models import load_config as model_config

ROOT = Path(__file__).resolve().parents[2]
GIB = 2 ** 30


def _setup(model_dir: Path, *keys: str, budget: float | None = 2 ** 34) -> tuple[Config, RunPlan]:
    """A grpo config of the tiny model and the plan train starts it with on a GPU (budget given) or the CPU."""
    cfg = load_config(None, [f"model.path={model_dir}", "method.target_modules=[q_proj,v_proj]", "method.dropout=0",
                             "train.objective=grpo", "train.micro_batch_size=2", "train.grad_accum=1",
                             "train.batch_size=2", "train.gradient_checkpointing=false", "grpo.rewards=[]", *keys])
    plan = run_plan.for_estimate(cfg, budget)
    return plan.apply(cfg), plan


def _kv_token(mcfg: LlamaConfig, width: int) -> int:
    return 2 * mcfg.num_hidden_layers * mcfg.num_key_value_heads * (mcfg.hidden_size // mcfg.num_attention_heads) \
        * width


def test_the_parts_add_up_to_the_peak(tiny_model_dir):
    cfg, plan = _setup(tiny_model_dir, "grpo.num_generations=4", "grpo.max_new_tokens=8")
    mcfg = model_config(str(tiny_model_dir))
    est = grpo_memory.estimate(cfg, plan, mcfg, [30, 20], kept=True, cache_len=40)
    t = est.train
    assert est.packed and t.notes[0].startswith("fast engine: packed rows of 264 tokens")  # 4 x (30+8) + 4 x (20+8)
    assert est.weights == t.weights + t.trainable and est.optimizer == t.optimizer == 2 * t.trainable > 0
    assert est.train_pass == t.peak_allocated - t.persistent > 0
    assert est.no_grad == 0  # beta 0, one step per generation: no reference, no old log-probs pass
    assert est.peak_allocated == t.persistent + est.kv_cache + max(est.sampling, est.train_pass)  # the cache kept
    assert est.peak == est.peak_allocated + t.allocator and est["peak"] == est.peak
    # a bf16 cache (the plan's compute dtype, not the fp32 adapter's) for 8 rows of 64 tokens (40 rounded up)
    assert decode.LENGTH_STEP == 64 and est.kv_cache == _kv_token(mcfg, 2) * 8 * 64
    eager = grpo_memory.estimate(cfg, plan, mcfg, [30, 20], kept=False)
    assert eager.kv_cache == _kv_token(mcfg, 2) * 8 * (30 + 8)  # generate's cache: the longest row, freed after
    assert eager.peak_allocated == t.persistent + max(eager.kv_cache + eager.sampling, eager.train_pass)
    line = grpo_memory.line(est, 8)
    assert line.startswith(f"grpo memory estimate: weights {est.weights / GIB:.2f} GiB; optimizer state (AdamW) "
                           f"{est.optimizer / GIB:.2f} GiB; sampling 8 completions of up to 30+8 tokens: KV cache ")
    assert line.endswith(f"(kept between steps); training pass over them (264 tokens, packed rows, the longest "
                         f"prompts) {est.train_pass / GIB:.2f} GiB; peak about {est.peak_allocated / GIB:.2f} GiB "
                         f"allocated, {est.peak / GIB:.2f} GiB reserved")


def test_the_no_grad_passes_count_with_a_reference_or_old_log_probs(tiny_model_dir):
    mcfg = model_config(str(tiny_model_dir))
    plain = grpo_memory.estimate(*_setup(tiny_model_dir), mcfg, [30, 20], kept=True)
    for key in ("grpo.beta=0.04", "grpo.steps_per_generation=2"):
        est = grpo_memory.estimate(*_setup(tiny_model_dir, key), mcfg, [30, 20], kept=True)
        h, inter = mcfg.hidden_size, mcfg.intermediate_size
        forward = est.tokens * (grpo_memory.NO_GRAD_HIDDEN * h + grpo_memory.NO_GRAD_INTER * inter) * 2
        chunk = min(linear_ce.chunk_rows(mcfg.vocab_size), est.rows * 256)
        assert est.no_grad == forward + chunk * mcfg.vocab_size * memory.FAST_LOGIT_BYTES
        assert est.train == plain.train and plain.no_grad == 0  # the training pass is the same


@pytest.mark.parametrize("g, new", [(2, 8), (4, 8), (4, 24)])
def test_it_grows_with_g_and_max_new_tokens_as_the_formula_says(tiny_model_dir, g, new):
    cfg, plan = _setup(tiny_model_dir, f"grpo.num_generations={g}", f"grpo.max_new_tokens={new}")
    mcfg = model_config(str(tiny_model_dir))
    est = grpo_memory.estimate(cfg, plan, mcfg, [30, 20], kept=False)
    h, inter, layers = mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_hidden_layers
    assert est.rows == 2 * g and est.tokens == g * (30 + new) + g * (20 + new)  # packed: the real tokens
    assert est.kv_cache == _kv_token(mcfg, 2) * 2 * g * (30 + new)
    # the fast engine's saved activations without checkpointing (memory._fast), over the completion rows' tokens
    # plus each fp32 adapter's bf16 copy, made once a step (kernels/lora_math.cast_once)
    casts = est.train.trainable / 4 * 2
    assert est.train.activations == pytest.approx(est.tokens * layers * memory.FAST_LAYER_COEF * (h + inter)
                                                  + est.tokens * memory.FAST_BACKWARD * h + memory.FAST_CONST + casts)


def test_checkpointing_lowers_the_training_pass(tiny_model_dir):
    mcfg = model_config(str(tiny_model_dir))
    off = grpo_memory.estimate(*_setup(tiny_model_dir, "grpo.max_new_tokens=64"), mcfg, [200, 180], kept=True)
    on = grpo_memory.estimate(*_setup(tiny_model_dir, "grpo.max_new_tokens=64", "train.gradient_checkpointing=true"),
                              mcfg, [200, 180], kept=True)
    assert on.train_pass < off.train_pass and on.peak_allocated < off.peak_allocated
    assert on.kv_cache == off.kv_cache and on.weights == off.weights


def test_padded_rows_count_the_longest_row_and_one_chunk_of_logits(tiny_model_dir):
    cfg, plan = _setup(tiny_model_dir, "train.device=cpu", "train.precision=fp32", "grpo.num_generations=8",
                       "grpo.max_new_tokens=256", budget=None)
    mcfg = LlamaConfig(vocab_size=128256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    est = grpo_memory.estimate(cfg, plan, mcfg, [64, 10], kept=False)
    assert not est.packed and est.tokens == 16 * (64 + 256)  # every row as wide as the longest
    chunk = linear_ce.chunk_rows(128256)  # 261 rows of the 4,096 completion tokens (fp32: twice bf16's bytes)
    assert est.train.logits == pytest.approx(chunk * 128256 * memory.LOGIT_BYTES * 2)
    assert est.kv_cache == _kv_token(mcfg, 4) * 16 * (64 + 256)


def test_the_bench_configuration_is_pinned(tiny_model_dir):
    """bench/grpo_speed.py's slimtune recipe (1B shape, LoRA r16 on the seven projections, 8 prompts x G=8 of 256
    new tokens, one micro-batch, checkpointing off, the compiled decoder's kept cache) on an H100's plan. Measured
    there (2026-12-05): 31.08 GiB allocated at the peak. The fast engine's coefficients were fitted on eager layers;
    the bench compiles them (kernels/compiled.py), which saves less without checkpointing: not yet measured."""
    sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "bench" / "peers")]
    try:
        from grpo_speed import ALL_LINEAR, prompt_ids
        from seed_recipe import model_config as seed_config
    finally:
        del sys.path[:2]
    targets = f"method.target_modules=[{','.join(ALL_LINEAR)}]"
    cfg, plan = _setup(tiny_model_dir, "method.r=16", "method.alpha=16", targets, "train.micro_batch_size=8",
                       "train.batch_size=8", "grpo.num_generations=8",
                       "grpo.max_new_tokens=256", budget=80 * GIB)
    mcfg = seed_config("1b", max_position_embeddings=4096)
    records = [PromptRecord(ids, "", None, f"synthetic {i}") for i, ids in enumerate(prompt_ids(8 * 22, 128256))]
    est, line = grpo_memory.predict(mcfg, plan, records, cfg, kept=True)
    longest = sorted(len(r.prompt_ids) for r in records)[-8:]  # the worst micro-batch's 8 prompts, G rows each
    assert est.prompt_len == 119 and est.tokens == 8 * sum(longest) + 64 * 256 == 23872
    assert round(est.weights / GIB, 2) == 2.34 and round(est.optimizer / GIB, 3) == 0.084
    assert round(est.kv_cache / GIB, 2) == 0.75  # bf16, 64 rows x 384 tokens (119 + 256 rounded up to 64)
    assert round(est.train_pass / GIB, 2) == 39.71 and round(est.peak_allocated / GIB, 2) == 42.89
    assert "(23872 tokens, packed rows, the longest prompts)" in line


def test_the_estimate_leaves_the_training_rng_alone(tiny_model_dir):
    """Building the estimator's meta model draws from the CPU RNG: a run's dropout must not depend on whether an
    earlier estimate had already built (and cached) it."""
    cfg, plan = _setup(tiny_model_dir)
    mcfg = LlamaConfig(vocab_size=1031, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)  # a shape no other test has cached
    torch.manual_seed(0)
    before = torch.get_rng_state()
    grpo_memory.estimate(cfg, plan, mcfg, [30, 20], kept=False)
    assert torch.equal(torch.get_rng_state(), before)
