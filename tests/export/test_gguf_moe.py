"""GGUF export of mixture-of-experts models: Qwen3-MoE (llama.cpp's qwen3moe) read back by transformers' GGUF
loader gives the merged model's logits; Mixtral (llama.cpp's llama with experts) carries llama.cpp's stacked
expert tensors; what llama.cpp would run differently, and gpt-oss, are refused in one line."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from slimtune import cli, models
from test_gguf import rel_error
from slimtune.export import ExportError
from slimtune.export import gguf as gguf_mod

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.1)
# an expert width other than Qwen3MoeConfig's default (768): transformers' GGUF reader does not map llama.cpp's
# expert_feed_forward_length back, models.load_gguf does
MOE = {"qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256, norm_topk_prob=True),
       "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
       "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2)}
# relative logit error ||gguf - merged|| / ||merged||, the bars of tests/export/test_gguf.py; measured here when
# written: f16 7.5e-4, q8_0 2.0e-2 (routing amplifies rounding: a token whose top-2 flips takes another expert)
REL = {"f16": 1e-2, "q8_0": 3e-2}
PROMPTS = ["Hello there! How are you today?", "Who are you? I am a small model."]


def _folder(tmp_path, tokenizer, arch: str, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, vocab_size=len(tokenizer), **SHAPE, **{**MOE[arch], **extra})
    folder = tmp_path / arch
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("quant", list(REL))
def test_qwen3_moe_reads_back_with_the_merged_models_logits(quant, tmp_path, tokenizer):
    from gguf import GGUFReader

    folder = _folder(tmp_path, tokenizer, "qwen3_moe")
    path = tmp_path / "moe.gguf"
    result = gguf_mod.write_gguf(folder, path, quant, log=lambda *_: None, imatrix="off")
    assert result["arch"] == "qwen3moe"
    reader = GGUFReader(str(path))
    shapes = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}  # ggml order: innermost first
    assert shapes["blk.1.ffn_gate_exps.weight"] == shapes["blk.1.ffn_up_exps.weight"] == (64, 256, 4)
    assert shapes["blk.1.ffn_down_exps.weight"] == (256, 64, 4) and shapes["blk.0.ffn_gate_inp.weight"] == (64, 4)
    assert reader.fields["qwen3moe.expert_count"].contents() == 4
    assert reader.fields["qwen3moe.expert_used_count"].contents() == 2
    assert reader.fields["qwen3moe.expert_feed_forward_length"].contents() == 256
    back, _ = models.load_gguf(path)  # as `slimtune chat model.gguf` loads it
    assert type(back).__name__ == "Qwen3MoeForCausalLM"
    assert rel_error(folder, back, tokenizer, PROMPTS) < REL[quant]


def test_mixtral_experts_are_stacked_under_llama_cpps_names(tmp_path, tokenizer):
    from gguf import GGUFReader
    from safetensors.torch import load_file

    folder = _folder(tmp_path, tokenizer, "mixtral")
    path = tmp_path / "mixtral.gguf"
    assert gguf_mod.write_gguf(folder, path, "f16", log=lambda *_: None)["arch"] == "llama"
    tensors = {t.name: np.array(t.data) for t in GGUFReader(str(path)).tensors}
    source = load_file(folder / "model.safetensors")
    for layer in range(2):
        for w, gguf_name in (("w1", "ffn_gate_exps"), ("w3", "ffn_up_exps"), ("w2", "ffn_down_exps")):
            want = np.stack([source[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"].numpy()
                             for e in range(4)])
            got = tensors[f"blk.{layer}.{gguf_name}.weight"].astype(np.float32)
            assert got.shape == want.shape and np.abs(got - want).max() < 1e-3  # f16 rounding
        assert f"blk.{layer}.ffn_gate_inp.weight" in tensors
    assert not [n for n in tensors if "experts" in n]


def test_what_llama_cpp_would_run_differently_is_refused(tmp_path, tokenizer):
    folder = _folder(tmp_path, tokenizer, "qwen3_moe", norm_topk_prob=False)
    with pytest.raises(ExportError, match="norm_topk_prob is false, but llama.cpp's qwen3moe always renormalizes"):
        gguf_mod.write_gguf(folder, tmp_path / "x.gguf", "f16", log=lambda *_: None)
    assert not (tmp_path / "x.gguf").exists()


def test_gpt_oss_is_refused_in_one_line_naming_it(tmp_path, tokenizer, capsys):
    folder = _folder(tmp_path, tokenizer, "gpt_oss")
    capsys.readouterr()  # save_pretrained's progress bars
    assert cli.main(["export", str(folder), "--output", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json: model_type 'gpt_oss' cannot be exported to GGUF by slimtune; supported: gemma3_text, " \
           "llama, mistral, mixtral, qwen2, qwen3, qwen3_moe" in err and len(err.splitlines()) == 1
