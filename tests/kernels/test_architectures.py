"""Qwen2 (q/k/v bias), Qwen3 (q_norm/k_norm) and Mistral (sliding window) through the fast path on the CPU:
packed rows, chunked loss, fused LoRA and the tiled MLP give the plain path's per-step losses through the
whole loop, and the kernel record says what was on; a model a fast path cannot take falls back with one
printed reason per path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import lora_run_config
from slimtune import config, load_config, methods
from slimtune import train as train_mod
from slimtune.runs.metrics_log import read_metrics
from slimtune.kernels import select

STEPS = 4
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.2)
ARCHS = {
    "qwen2": {},  # q, k and v projections carry a bias (Qwen2Attention builds them so)
    "qwen3": {"head_dim": 16},  # RMSNorm over each head's q and k before RoPE
    "mistral": {"head_dim": 16, "sliding_window": 16},  # shorter than the ~52-token records: the window bites
}
PLAIN = dict(packing="off", loss="plain", fused_lora="off", tiled_mlp="off")
FAST = dict(packing="rows", loss="chunked", fused_lora="on", tiled_mlp="on")
# fp32 on the CPU: the fast path runs the same matmuls in another order (attention per record, the head a
# chunk of rows at a time, the MLP a slice of tokens at a time, LoRA's update by addmm); after 4 updates at
# lr 1e-2 the losses moved by at most ~1e-6 when this was written.
ATOL = 1e-5


def _model_dir(tmp: Path, arch: str, tokenizer) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, vocab_size=len(tokenizer), **SHAPE, **ARCHS[arch])
    folder = tmp / arch
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _train(tmp: Path, model_dir: Path, name: str, **train) -> tuple[dict, list[float], list[str]]:
    path = lora_run_config(tmp, model_dir, name, method={"dropout": 0.0, "target_modules": ["all-linear"]},
                           max_steps=STEPS, micro_batch_size=2, grad_accum=2, eval_at_start=False, **train)
    lines: list[str] = []
    result = train_mod.from_config(load_config(path), show_progress=False, log=lambda *a, **k: lines.append(" ".join(
        map(str, a))))
    losses = [r["loss"] for r in read_metrics(tmp / name / "metrics.jsonl") if "loss" in r]
    return result, losses, lines


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_fast_path_trains_as_the_plain_one(arch, tmp_path, tokenizer):
    model_dir = _model_dir(tmp_path, arch, tokenizer)
    _, plain, _ = _train(tmp_path, model_dir, "plain", **PLAIN)
    result, fast, lines = _train(tmp_path, model_dir, "fast", **FAST)
    assert len(plain) == len(fast) == STEPS
    assert max(abs(a - b) for a, b in zip(plain, fast)) < ATOL, (plain, fast)
    assert plain[-1] < plain[0] - 0.05  # it trains: a test that compared two frozen runs would pass too
    took = {k: result[k] for k in select.Kernels().as_dict()}
    assert took == {"packing": "rows", "chunked_loss": True, "fused_lora_layers": 14,  # 2 layers x 7 linears
                    "fused_expert_layers": 0, "fused_norm_mlp": 0, "fused_rope": 0, "tiled_mlp": 2,
                    "compiled_layers": 0}  # Liger, compile: CUDA
    assert not [line for line in lines if line.startswith("fast path off")]


def _tiny(arch: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=300, **SHAPE, **extra))


def test_a_model_a_fast_path_cannot_take_falls_back_with_one_reason_each():
    """Gemma2 caps its attention logits (no packing) and its MLP is not Llama's (no tiling); LoRA with dropout
    keeps peft's layers. Device "cuda" only as auto's choice: nothing here runs on a GPU."""
    model = methods.apply(_tiny("gemma2", head_dim=16), config.MethodConfig(r=4, dropout=0.1,
                                                                           target_modules=["q_proj", "v_proj"]))
    lines: list[str] = []
    try:
        took = select.enable(model, config.TrainConfig(fused_norm_mlp="off", fused_rope="off"), "cuda", lines.append)
    finally:
        select.disable(model)
    assert took == select.Kernels(packing="off", chunked_loss=True)
    assert lines == [
        "fused LoRA layers: 4 of 4 stay peft's: LoRA dropout 0.1 (set method.dropout=0 to fuse)",
        "fast path off: train.packing=auto: records padded, not packed: its config sets attn_logit_softcapping, "
        "which packed attention does not implement",
        "fast path off: train.tiled_mlp=auto: Gemma2ForCausalLM has no Llama-style MLP (gate_proj, up_proj, "
        "down_proj); its own forward runs"]


def test_what_the_cpu_does_not_ask_for_is_not_reported():
    """auto on the CPU turns packing, fused LoRA and tiling off by design: no fallback to report."""
    model = methods.apply(_tiny("gemma2", head_dim=16), config.MethodConfig(r=4, dropout=0.1,
                                                                           target_modules=["q_proj", "v_proj"]))
    lines: list[str] = []
    select.enable(model, config.TrainConfig(), "cpu", lines.append)
    select.disable(model)
    assert lines == []
