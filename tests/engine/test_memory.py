"""The memory estimator's byte accounting, checked against hand-computed values on a tiny config."""
from __future__ import annotations

import pytest

from slimtune import cli, config
from slimtune.engine import memory

# tiny Llama: h=64, i=128, 2 layers, 4 heads, 2 KV heads (k/v width 32), vocab 400, tied embeddings
EMBED = 400 * 64
LAYER_LINEARS = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128  # q k v o gate up down = 36,864
NORMS = 2 * 2 * 64 + 64  # two per layer + the final one
TOTAL = EMBED + 2 * LAYER_LINEARS + NORMS
LORA_QV = 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4))  # r=4 on q (64->64) and v (64->32), 2 layers


def _cfg(tiny_model_dir, **train) -> config.Config:
    cfg = config.Config()
    cfg.model.path = str(tiny_model_dir)
    # LoRA dropout: peft's own layers, the padded engine's estimate (_fast: dropout 0, the default)
    cfg.method = config.MethodConfig(r=4, dropout=0.05, target_modules=["q_proj", "v_proj"])
    cfg.train = config.TrainConfig(**{"precision": "bf16", "micro_batch_size": 2, **train})
    cfg.data.max_len = 10
    return cfg


def test_lora_bf16_components(tiny_model_dir):
    assert TOTAL == 99_648 and LORA_QV == 1_792
    est = memory.estimate(_cfg(tiny_model_dir))
    assert est.weights == TOTAL * 2  # bf16 base
    assert est.trainable == est.gradients == est.optimizer_step_extra == LORA_QV * 4  # fp32 adapters
    assert est.optimizer == 2 * LORA_QV * 4  # AdamW exp_avg + exp_avg_sq
    tokens = 2 * 10
    per_layer = memory.LAYER_COEF["lora"] * (64 + 128)
    assert est.activations == pytest.approx(tokens * 2 * per_layer)
    assert est.activations_other == pytest.approx(tokens * 2 * 64 * 2 + tokens * per_layer)  # checkpointed
    assert est.logits == pytest.approx(tokens * 400 * memory.LOGIT_BYTES)
    persistent = TOTAL * 2 + LORA_QV * 4 * 3
    assert est.peak_allocated == pytest.approx(persistent + est.activations + est.logits)
    assert est.peak == pytest.approx(est.peak_allocated + memory.ALLOC_SLACK * (est.activations + est.logits))


def test_checkpointing_swaps_the_activation_terms(tiny_model_dir):
    off = memory.estimate(_cfg(tiny_model_dir))
    on = memory.estimate(_cfg(tiny_model_dir, gradient_checkpointing=True))
    assert on.activations == pytest.approx(off.activations_other)
    assert on.activations_other == pytest.approx(off.activations)


def test_qlora_packs_the_layer_linears_into_nf4(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    cfg.method.name = "qlora"
    est = memory.estimate(cfg)
    nf4 = 2 * LAYER_LINEARS * (0.5 + 1 / 64 + 4 / (64 * 256))  # 4 bits + absmax per 64 + its fp32 scale
    assert est.weights == pytest.approx(nf4 + (EMBED + NORMS) * 2)


def test_full_training_fp32_master_weights(tiny_model_dir):
    cfg = _cfg(tiny_model_dir)
    cfg.method.name = "full"
    est = memory.estimate(cfg)
    assert est.weights == 0 and est.trainable == TOTAL * 4 and est.optimizer == TOTAL * 8
    # the optimizer step: state + every gradient + one foreach temporary
    step_peak = est.weights + est.trainable + est.optimizer + TOTAL * 4 + TOTAL * 4
    assert est.peak_allocated == pytest.approx(max(step_peak, est.persistent + est.activations + est.logits))


def test_fp32_doubles_activation_bytes(tiny_model_dir):
    half = memory.estimate(_cfg(tiny_model_dir))
    full = memory.estimate(_cfg(tiny_model_dir, precision="fp32"))
    assert full.activations == pytest.approx(2 * half.activations)
    assert full.weights == 2 * half.weights


def test_grad_accumulation_keeps_gradients_through_the_forward(tiny_model_dir):
    cfg = _cfg(tiny_model_dir, grad_accum=4)
    cfg.method.name = "full"
    est = memory.estimate(cfg)
    assert est.peak_allocated == pytest.approx(est.persistent + max(
        est.activations + est.logits + est.gradients, est.gradients + est.optimizer_step_extra))


def test_budget_suggestions_fit(tmp_path, capsys):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path)
    argv = ["estimate", f"model.path={tmp_path}", "train.micro_batch_size=8", "data.max_len=1024",
            "train.precision=bf16", "--budget", "24GiB"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "changes that fit:" in out
    line = out.splitlines()[-1]
    assert float(line.split()[-2]) <= 24.0


def test_parse_size():
    assert memory.parse_size("24GiB") == 24 * 2 ** 30
    assert memory.parse_size("24GB") == memory.parse_size("24g") == 24 * 2 ** 30
    assert memory.parse_size("1500MiB") == 1500 * 2 ** 20
    assert memory.parse_size("24") == memory.parse_size(" 24 ") == 24 * 2 ** 30  # a bare number is GiB, not bytes
    assert memory.parse_size("0.5") == 2 ** 29 and memory.parse_size("512B") == 512
    for bad in ("lots", "0", "1.2.3", "-4", "", "nan", "24 GiBs"):
        with pytest.raises(config.ConfigError) as err:
            memory.parse_size(bad)
        assert str(err.value) == f"--budget {bad!r}: expected a positive size such as 24 (GiB), 24GiB or 1500MiB"


def _fast(tiny_model_dir, **train) -> config.Config:
    cfg = _cfg(tiny_model_dir, **{"packing": "rows", "fused_norm_mlp": "off", **train})
    cfg.method = config.MethodConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"])
    return cfg


def test_fast_engine_is_what_train_runs_on_a_gpu(tiny_model_dir):
    assert memory.fast_engine(_fast(tiny_model_dir))
    assert not memory.fast_engine(_cfg(tiny_model_dir))  # LoRA dropout: peft's own layers, padded model
    for key, value in (("packing", "off"), ("loss", "plain"), ("fused_lora", "off")):
        assert not memory.fast_engine(_fast(tiny_model_dir, **{key: value}))


def test_fast_engine_counts_real_tokens_one_loss_chunk_and_offload(tiny_model_dir):
    rows = [(10, 6), (7, 3)]  # packed: 17 real tokens, no padding to 2 x 10
    est = memory.estimate(_fast(tiny_model_dir, gradient_checkpointing=True), rows)
    per_layer = memory.FAST_LAYER_COEF * (64 + 128)
    stored = 17 * 2 * 64 * 2  # each layer's bf16 input
    backward = stored + 17 * (per_layer + memory.FAST_BACKWARD * 64)
    loss = stored + 17 * 64 * memory.FAST_FINAL_HIDDEN + 9 * 400 * memory.FAST_LOGIT_BYTES  # 9 trained rows
    casts = LORA_QV * 2  # each fp32 adapter's bf16 copy, made once a step (kernels/lora_math.cast_once)
    assert est.activations == pytest.approx(backward + memory.FAST_CONST + casts)
    assert est.logits == pytest.approx(max(0.0, loss - backward))
    off = memory.estimate(_fast(tiny_model_dir, gradient_checkpointing=True, offload_activations=True), rows)
    assert est.activations - off.activations == pytest.approx(stored)  # offloaded: no layer input stays
    plain = memory.estimate(_fast(tiny_model_dir, gradient_checkpointing=False), rows)
    assert plain.activations == pytest.approx(17 * 2 * per_layer + 17 * memory.FAST_BACKWARD * 64 + memory.FAST_CONST
                                              + casts)


def test_a_long_record_holds_one_mlp_slice_in_the_recomputed_layer(tiny_model_dir):
    """Past select.TILE_TOKENS the tiled MLP keeps one slice's intermediates (hidden 64: slices of 64 tokens)."""
    rows = [(70000, 69000)]
    tiled = memory.estimate(_fast(tiny_model_dir, gradient_checkpointing=True), rows)
    whole = memory.estimate(_fast(tiny_model_dir, gradient_checkpointing=True, tiled_mlp="off"), rows)
    assert whole.activations - tiled.activations == pytest.approx((70000 - 64) * memory.FAST_LAYER_COEF * 128)
    assert any("MLP in slices of 64 tokens" in n for n in tiled.notes)
    short = [(10, 6), (7, 3)]
    assert memory.estimate(_fast(tiny_model_dir, gradient_checkpointing=True), short).activations == \
        memory.estimate(_fast(tiny_model_dir, gradient_checkpointing=True, tiled_mlp="off"), short).activations


def test_fast_engine_loss_holds_one_chunk(tiny_model_dir, monkeypatch):
    from slimtune.kernels import linear_ce

    monkeypatch.setattr(linear_ce, "CHUNK_BYTES", 4 * 400 * 5)  # 16 rows (the floor) per chunk
    rows = [(10, 10)] * 4  # 40 trained positions, but only one chunk of 16 rows at a time
    est = memory.estimate(_fast(tiny_model_dir, micro_batch_size=4), rows)
    per_layer = memory.FAST_LAYER_COEF * (64 + 128)
    stored = 40 * 2 * per_layer
    loss = stored + 40 * 64 * memory.FAST_FINAL_HIDDEN + 16 * 400 * memory.FAST_LOGIT_BYTES
    assert est.logits == pytest.approx(max(0.0, loss - stored - 40 * memory.FAST_BACKWARD * 64))


def test_bins_take_the_whole_token_budget_and_auto_the_real_tokens(tiny_model_dir):
    rows = [(10, 5), (6, 3)]
    bins = memory.estimate(_fast(tiny_model_dir, packing="on"), rows)
    full = memory.estimate(_fast(tiny_model_dir, packing="rows"), [(10, 5), (10, 5)])
    assert bins.activations == pytest.approx(full.activations)  # 2 x max_len = 20 tokens either way
    # auto packs rows on a GPU (kernels/select.py): the 16 tokens the records have, as packing=rows counts them
    auto = memory.estimate(_fast(tiny_model_dir, packing="auto"), rows)
    assert auto.activations == pytest.approx(memory.estimate(_fast(tiny_model_dir, packing="rows"), rows).activations)
    assert auto.activations < bins.activations


def test_offload_is_suggested_on_the_fast_engine(tiny_model_dir):
    cfg = _fast(tiny_model_dir, gradient_checkpointing=True)
    est = memory.estimate(cfg)
    texts = [t for t, _ in memory.suggestions(cfg, est.peak + est.cuda_context - 1)]
    assert "train.offload_activations=true" in texts


def test_faster_split_same_records_per_step(tiny_model_dir):
    cfg = _fast(tiny_model_dir, gradient_checkpointing=True, micro_batch_size=2, grad_accum=4)
    text, peak = memory.faster(cfg)
    assert text == "train.micro_batch_size=8 train.grad_accum=1 train.offload_activations=true"
    one = _fast(tiny_model_dir, gradient_checkpointing=True, micro_batch_size=8, grad_accum=1, offload_activations=True)
    est = memory.estimate(one)
    assert peak == pytest.approx(est.peak + est.cuda_context)
    assert memory.faster(_fast(tiny_model_dir, gradient_checkpointing=True, grad_accum=1)) is None  # nothing to merge
    assert memory.faster(_cfg(tiny_model_dir, gradient_checkpointing=True, grad_accum=4)) is None  # padded engine


def test_estimate_cli_prints_the_faster_split(tmp_path, tiny_model_dir, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {{path: {tiny_model_dir}}}\nmethod: {{name: lora, dropout: 0.0}}\n"
                   "train: {micro_batch_size: 2, grad_accum: 4, gradient_checkpointing: true}\n")
    assert cli.main(["estimate", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "faster on a GPU, same records per step: train.micro_batch_size=8 train.grad_accum=1" in out
