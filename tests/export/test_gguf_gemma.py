"""GGUF export of Gemma 3 (llama.cpp's gemma3): a tiny random Gemma 3 read back by transformers' GGUF loader gives
the merged model's logits, its norms are stored as 1 + w with the sliding window written, and what llama.cpp's
gemma3 would run differently is refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimtune import models
from test_gguf import rel_error
from slimtune.export import ExportError
from slimtune.export import gguf as gguf_mod

# head_dim 256 = query_pre_attn_scalar, as in every Gemma 3 llama.cpp runs (it scales queries by 1/sqrt(head_dim));
# 6 layers: the sixth has full attention, the others a sliding window shorter than the longest prompt
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=1,
             head_dim=256, query_pre_attn_scalar=256, sliding_window=8, max_position_embeddings=512,
             tie_word_embeddings=True, initializer_range=0.1)
REL = {"f16": 1e-2, "q8_0": 3e-2}  # the bars of tests/export/test_gguf.py
PROMPTS = ["Hello there! How are you today?", "Who are you? I am a small model."]


def _folder(tmp_path, tokenizer, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma3_text", vocab_size=len(tokenizer),
                                                                  **{**SHAPE, **extra}))
    for name, p in model.named_parameters():  # Gemma's norms start at 0 (scale 1 + w): give them values to carry
        if name.endswith("norm.weight"):
            p.data.normal_(0, 0.3)
    folder = tmp_path / "gemma3"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("quant", list(REL))
def test_gemma3_reads_back_with_the_merged_models_logits(quant, tmp_path, tokenizer):
    from gguf import GGUFReader
    from safetensors.torch import load_file

    folder = _folder(tmp_path, tokenizer)
    path = tmp_path / "gemma3.gguf"
    assert gguf_mod.write_gguf(folder, path, quant, log=lambda *_: None, imatrix="off")["arch"] == "gemma3"
    reader = GGUFReader(str(path))
    assert reader.fields["gemma3.attention.sliding_window"].contents() == 8
    assert reader.fields["gemma3.attention.key_length"].contents() == 256
    assert reader.fields["gemma3.rope.freq_base"].contents() == 1e6  # the full-attention layers' base
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    source = load_file(folder / "model.safetensors")
    for hf, ours in (("model.layers.5.pre_feedforward_layernorm.weight", "blk.5.ffn_norm.weight"),
                     ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight"),
                     ("model.norm.weight", "output_norm.weight")):
        np.testing.assert_allclose(tensors[ours], source[hf].numpy() + 1.0, rtol=1e-6)
    back, _ = models.load_gguf(path)  # as `slimtune chat model.gguf` loads it
    assert type(back).__name__ == "Gemma3ForCausalLM"
    # the window matters for these prompts
    assert max(len(ids) for ids in tokenizer(PROMPTS)["input_ids"]) > SHAPE["sliding_window"]
    assert rel_error(folder, back, tokenizer, PROMPTS) < REL[quant]


@pytest.mark.parametrize("extra, why", [
    (dict(query_pre_attn_scalar=128), "query_pre_attn_scalar 128 is not head_dim 256"),
    (dict(final_logit_softcapping=30.0), "logit soft-capping is set"),
    (dict(layer_types=["full_attention"] * 6), "layer_types: llama.cpp's gemma3 runs every 6th layer"),
    (dict(rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                           "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
     "RoPE scaling \\(linear\\) is not written for gemma3"),
])
def test_what_llama_cpps_gemma3_would_run_differently_is_refused(extra, why, tmp_path, tokenizer):
    folder = _folder(tmp_path, tokenizer, **extra)
    with pytest.raises(ExportError, match=f"config.json: {why}.*convert this model with llama.cpp"):
        gguf_mod.write_gguf(folder, tmp_path / "x.gguf", "f16", log=lambda *_: None)
    assert not (tmp_path / "x.gguf").exists()
