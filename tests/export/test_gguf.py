"""`slimtune export` on tiny random models (Llama, Qwen2, Qwen3, Mistral): the GGUF file read back by
transformers' GGUF loader gives the merged model's logits, tokens, chat template and stop tokens."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import CORPUS, write_jsonl
from slimtune import cli
from slimtune.data.templates import FAMILIES, render
from slimtune.export import gguf as gguf_mod

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
PROMPTS = ["Hello there! How are you today?", "Who are you? I am a small model.", "<|im_start|>user\n1 2 3"]
# Relative logit error ||gguf - merged|| / ||merged|| on the tiny models (initializer_range 0.1, logits up
# to ~3.4). Measured: f16 6.7e-4, bf16 5.4e-3, q8_0 1.9e-2 (Llama; Qwen2/Qwen3 a little lower). f16 and
# bf16 carry the bar of 1e-2; q8_0 gets 3e-2 (its per-32 scale rounds each weight to 1/254 of
# the block's largest, ~30x coarser than f16).
REL = {"f16": 1e-2, "bf16": 1e-2, "q8_0": 3e-2}


def tiny_model(vocab: int, arch: str, hidden: int = 64, seed: int = 0):
    """conftest's tiny model with initializer_range 0.1 (as tests/evaluate/test_merge.py): at 0.2 bf16
    rounding alone moves its logits by 1e-2 relative, at 0.1 by 5e-3."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, tie_word_embeddings=True, initializer_range=0.1)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("gguf-models")
    out = {}
    for arch in ARCHS:
        tiny_model(len(tokenizer), arch).save_pretrained(tmp / arch)
        tokenizer.save_pretrained(tmp / arch)
        out[arch] = tmp / arch
    return out


def load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def rel_error(folder, gguf_model, tokenizer, prompts: list[str] = PROMPTS) -> float:
    """|logits read back from the GGUF - the merged folder's| / |the merged folder's| over the prompts."""
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(folder).eval()
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        want, got = merged(**enc).logits, gguf_model(**enc).logits
    return float((got - want).norm() / want.norm())


def quiet(*_):
    pass


@pytest.mark.parametrize("quant", ["f16", "bf16", "q8_0"])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_the_merged_model(arch, quant, folders, tokenizer, tmp_path):
    path = tmp_path / f"{arch}-{quant}.gguf"
    result = gguf_mod.write_gguf(folders[arch], path, quant, log=quiet)
    model, _ = load_gguf(path)
    want_class = {"mistral": "LlamaForCausalLM"}.get(arch, f"{arch.capitalize()}ForCausalLM")
    assert type(model).__name__ == want_class  # Mistral is written as llama, as llama.cpp does
    assert rel_error(folders[arch], model, tokenizer) <= REL[quant]
    assert result["arch"] == ("llama" if arch == "mistral" else arch)


def test_permutation_is_what_transformers_undoes():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    for heads in (1, 2, 3):
        permuted = gguf_mod.permute_qk(w, heads)
        assert not np.array_equal(permuted, w)
        assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(permuted, heads, heads), w)


def test_tokenizer_metadata_round_trips(folders, tokenizer, tmp_path):
    from gguf import GGUFReader, TokenType

    path = tmp_path / "tok.gguf"
    gguf_mod.write_gguf(folders["llama"], path, "f16", log=quiet)
    _, back = load_gguf(path)
    texts = CORPUS + [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                                    add_generation_prompt=True) for c in CORPUS[:3]]
    for text in texts:
        want = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert back(text, add_special_tokens=False)["input_ids"] == want
    fields = GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt2"
    types = fields["tokenizer.ggml.token_type"].contents()
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert types[im_end] == TokenType.CONTROL and types[300] == TokenType.NORMAL
    assert fields["tokenizer.ggml.eos_token_id"].contents() == im_end == back.eos_token_id
    assert fields["tokenizer.ggml.bos_token_id"].contents() == tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eot_token_id"].contents() == im_end  # ChatML: eos is the end of turn
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert len(fields["tokenizer.ggml.merges"].contents()) == len(json.loads(tokenizer.backend_tokenizer.to_str())
                                                                 ["model"]["merges"])


def test_q4_k_m_mix_and_fallbacks(tokenizer, tmp_path):
    """hidden 256: Q4_K rows; token_embd (tied, so also the output) Q6_K, attn_v/ffn_down of the last layer
    Q6_K (llama.cpp's use_more_bits for 2 layers), norms F32. At hidden 64 every K type falls back."""
    from gguf import GGUFReader

    folder = tmp_path / "wide"
    tiny_model(len(tokenizer), "llama", hidden=256).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    path = tmp_path / "wide.gguf"
    gguf_mod.write_gguf(folder, path, "q4_k_m", log=quiet)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}
    assert types["token_embd.weight"] == "Q6_K" and types["output_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == "Q4_K"
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"
    assert [gguf_mod._more_bits(i, 32) for i in range(8)] == [True] * 4 + [False, False, True, False]
    # each weight read back by transformers (dequantized, Q/K un-permuted) against the original: measured
    # 0.072 for Q4_K and 0.018 for Q6_K tensors, as on Gaussian data in test_quants.py. (The logits of a
    # random model amplify this: 0.31 relative for q4_k_m, 0.41 for q4_0, so they are no test here.)
    model, _ = load_gguf(path)
    want, got = dict(tiny_model(len(tokenizer), "llama", hidden=256).named_parameters()), dict(model.named_parameters())
    errors = {n: float((got[n] - w).detach().norm() / w.norm()) for n, w in want.items() if w.dim() == 2}
    six = {"model.embed_tokens.weight", "model.layers.1.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    assert max(errors[n] for n in six) <= 0.02 and max(e for n, e in errors.items() if n not in six) <= 0.08
    assert min(e for n, e in errors.items() if n not in six) >= 0.05  # the rest is 4-bit indeed
    narrow = gguf_mod.pick_type("q4_k_m", "blk.1.attn_v.weight", (128, 64), 2, True)
    assert narrow.name == "Q8_0"
    assert gguf_mod.pick_type("q4_k_m", "blk.0.attn_q.weight", (64, 64), 2, True).name == "Q5_0"
    assert gguf_mod.pick_type("q8_0", "blk.0.attn_q.weight", (64, 48), 2, True).name == "F16"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, folders):
    """A 3-step LoRA run per template on the tiny Llama: auto (the tokenizer's ChatML) and llama3."""
    tmp = tmp_path_factory.mktemp("gguf-runs")
    rows = [{"instruction": f"Say something about {w}.", "output": f"Here is {w}. {w} is nice."}
            for w in ("Paris", "blue", "seven", "a dog")] * 3
    data = write_jsonl(tmp / "train.jsonl", rows)
    out = {}
    for template in ("auto", "llama3"):
        cfg = {"model": {"path": str(folders["llama"])},
               "data": {"train": str(data), "eval_size": 2, "max_len": 64, "template": template},
               "method": {"name": "lora", "r": 4, "dropout": 0.0},
               "train": {"output_dir": str(tmp / template), "max_steps": 3, "lr": 1e-2, "micro_batch_size": 4,
                         "warmup_steps": 0, "eval_at_start": False}}
        (tmp / f"{template}.yaml").write_text(yaml.safe_dump(cfg))
        assert cli.main(["train", str(tmp / f"{template}.yaml"), "--no-progress"]) == 0
        out[template] = tmp / template
    return out


CONVS = [[{"role": "user", "content": "Hi there"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": '你好 "quoted"\n'}],
         [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]


@pytest.mark.parametrize("template", ["auto", "llama3"])
def test_run_export_keeps_template_stops_and_adapter(template, runs, tokenizer, tmp_path, capsys):
    from slimtune.data.templates import stop_ids
    from slimtune.trained import load_run

    path = tmp_path / "run.gguf"
    assert cli.main(["export", str(runs[template]), "--output", str(path), "--quant", "f16"]) == 0
    assert "merge check" in capsys.readouterr().out  # merged first, with merge's own checks
    model, back = load_gguf(path)
    trained, tok, _ = load_run(runs[template])
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = trained(**enc).logits
        assert float((model(**enc).logits - want).norm() / want.norm()) <= REL["f16"]
    for conv in CONVS:  # the template read back from the file renders as training did
        if conv[-1]["role"] == "user":
            assert back.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
                render(template, conv, tok, add_generation_prompt=True).text
        else:
            after = FAMILIES["chatml" if template == "auto" else template].after_answer
            assert back.apply_chat_template(conv, tokenize=False) == render(template, conv, tok).text + after
    assert stop_ids("auto", back) == stop_ids(template, tok)  # generation stops where the run's does
    if template == "llama3":
        from gguf import GGUFReader

        eot = GGUFReader(str(path)).fields["tokenizer.ggml.eot_token_id"].contents()
        assert eot == tokenizer.convert_tokens_to_ids("<|eot_id|>") != tokenizer.eos_token_id


def test_several_quant_types_share_one_merge_and_one_importance_matrix(runs, tmp_path, capsys, monkeypatch):
    from gguf import GGUFReader, LlamaFileType as F

    from slimtune.export import imatrix as imatrix_mod

    computed, real = [], imatrix_mod.compute
    monkeypatch.setattr(imatrix_mod, "compute", lambda *a, **k: computed.append(1) or real(*a, **k))
    path = tmp_path / "run.gguf"
    assert cli.main(["export", str(runs["auto"]), "--output", str(path), "--quant", "q4_0,q8_0,q4_k_m"]) == 0
    out = capsys.readouterr().out
    assert out.count("merge check") == 1 and len(computed) == 1 and not path.exists()
    want = {"q4_0": F.MOSTLY_Q4_0, "q8_0": F.MOSTLY_Q8_0, "q4_k_m": F.MOSTLY_Q4_K_M}
    for quant, file_type in want.items():
        assert GGUFReader(str(tmp_path / f"run-{quant}.gguf")).fields["general.file_type"].contents() == file_type
    # the shared merge and matrix change nothing: the same bytes as the type exported alone
    assert cli.main(["export", str(runs["auto"]), "--output", str(tmp_path / "alone.gguf"), "--quant", "q4_0"]) == 0
    assert (tmp_path / "alone.gguf").read_bytes() == (tmp_path / "run-q4_0.gguf").read_bytes()
    capsys.readouterr()
    for quant, why in [("q4_0,q9", "choose one or more of f16, bf16"), ("q8_0,q8_0", "a type is named twice")]:
        assert cli.main(["export", str(runs["auto"]), "--output", str(tmp_path / "x.gguf"), "--quant", quant]) == 2
        assert why in capsys.readouterr().err
    assert cli.main(["export", str(runs["auto"]), "--output", str(tmp_path / "x.gguf"), "--quant", "q8_0,f16",
                     "--format", "ollama"]) == 2
    assert "a Modelfile names one GGUF file" in capsys.readouterr().err and not list(tmp_path.glob("x*"))


def test_refusals_are_one_clear_line(tmp_path, tokenizer, capsys):
    tiny_model(len(tokenizer), "gpt2").save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    assert cli.main(["export", str(tmp_path / "gpt2"), "--output", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "config.json: model_type 'gpt2' cannot be exported to GGUF" in err and "supported: gemma3_text, llama" in err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.part").exists()
    assert cli.main(["export", str(tmp_path), "--output", str(tmp_path / "x.gguf")]) == 2
    assert "neither a run folder (config.yaml) nor a transformers model folder" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path / "gpt2"), "--output", str(tmp_path / "model.bin")]) == 2
    assert "model.bin: name the file *.gguf (e.g. model.gguf)" in capsys.readouterr().err


def spm_tokenizer():
    """A SentencePiece-style BPE as Llama-2 / Mistral v0.1 ship it in tokenizer.json: "▁" for spaces,
    <0xNN> byte fallback, <unk>/<s>/</s>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    special = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=500, special_tokens=special,
                                                             show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    return fast


def test_sentencepiece_style_vocab(tmp_path):
    """model "llama": byte tokens typed BYTE, <unk> UNKNOWN, scores by id; transformers reads the same ids
    (text starting with two spaces aside: its GGUF reader splits those with Metaspace, not the normalizer)."""
    from gguf import GGUFReader, TokenType

    tok = spm_tokenizer()
    tiny_model(len(tok), "mistral").save_pretrained(tmp_path / "spm")
    tok.save_pretrained(tmp_path / "spm")
    path = tmp_path / "spm.gguf"
    result = gguf_mod.write_gguf(tmp_path / "spm", path, "f16", log=quiet)
    assert (result["tokenizer"], result["pre"]) == ("llama", "default")
    _, back = load_gguf(path)
    for text in CORPUS + ["Hello there ✓"]:  # ✓ is not in the vocabulary: three byte tokens
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    types = GGUFReader(str(path)).fields["tokenizer.ggml.token_type"].contents()
    assert types[0] == TokenType.UNKNOWN and types[1] == TokenType.CONTROL and types[3 + 0xE2] == TokenType.BYTE


def test_model_vocab_larger_than_the_tokenizer(tokenizer, tmp_path):
    """Qwen2's embeddings have rows no token uses: they are written as [PADn] UNUSED tokens, so the file's
    token list matches the tensor and transformers reads vocab_size back."""
    from gguf import GGUFReader, TokenType

    tiny_model(len(tokenizer) + 16, "qwen2").save_pretrained(tmp_path / "wide-vocab")
    tokenizer.save_pretrained(tmp_path / "wide-vocab")
    path = tmp_path / "wv.gguf"
    gguf_mod.write_gguf(tmp_path / "wide-vocab", path, "f16", log=quiet)
    fields = GGUFReader(str(path)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(tokenizer) + 16 and tokens[-1] == f"[PAD{len(tokenizer) + 15}]"
    assert fields["tokenizer.ggml.token_type"].contents()[-1] == TokenType.UNUSED
    model, _ = load_gguf(path)
    assert model.config.vocab_size == len(tokenizer) + 16
    assert rel_error(tmp_path / "wide-vocab", model, tokenizer) <= REL["f16"]


def test_llama3_rope_writes_rope_freqs_and_other_ropes_are_refused(tokenizer, tmp_path, monkeypatch):
    """Llama-3.1+ RoPE: llama.cpp divides frequency i by rope_freqs[i]. Expected values from the formula
    in Meta's reference (and llama.cpp's converter), independent of transformers' function we use."""
    import math

    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    cfg = AutoConfig.for_model("llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                               max_position_embeddings=512, rope_parameters=rope, tie_word_embeddings=True,
                               initializer_range=0.1)
    torch.manual_seed(0)
    source = AutoModelForCausalLM.from_config(cfg).eval()
    source.save_pretrained(tmp_path / "l3")
    tokenizer.save_pretrained(tmp_path / "l3")
    gguf_mod.write_gguf(tmp_path / "l3", tmp_path / "l3.gguf", "f16", log=quiet)
    got = {t.name: np.array(t.data) for t in GGUFReader(str(tmp_path / "l3.gguf")).tensors}["rope_freqs.weight"]
    want = []
    for i in range(0, 32, 2):
        wavelen = 2 * math.pi * 10000.0 ** (i / 32)
        if wavelen < 64 / 4.0:
            want.append(1.0)
        elif wavelen > 64 / 1.0:
            want.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            want.append(1 / ((1 - smooth) / 8.0 + smooth))
    assert np.allclose(got, want, rtol=1e-5)  # float32 ratios: 8.000001 where the formula says 8
    # transformers' reader alone builds default RoPE (0.34 relative off here); slimtune's load restores it
    # from the metadata its own header check read. The file is parsed by gguf.GGUFReader once (transformers
    # asked for it for the tokenizer, the config and the weights; slimtune twice more: each parse ~2 s of CPU
    # for a 49k-token vocabulary) and gguf's name map built once (transformers built it for each submodule)
    import gguf

    from slimtune import gguf_header, models

    readers, maps = [], []
    read, init, build = gguf.GGUFReader, gguf.TensorNameMap.__init__, gguf.get_tensor_name_map
    plain = gguf_header._PlainReader  # the subclass reads_once parses with
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: readers.append(a) or read(*a, **k))
    monkeypatch.setattr(gguf_header, "_PlainReader", lambda *a, **k: readers.append(a) or plain(*a, **k))
    monkeypatch.setattr(gguf.TensorNameMap, "__init__", lambda self, *a: maps.append(a) or init(self, *a))
    counted = gguf.GGUFReader
    loaded, _ = models.load(str(tmp_path / "l3.gguf"))
    assert len(readers) == 1 and len(maps) == 1, (readers, maps)
    assert gguf.GGUFReader is counted and gguf.get_tensor_name_map is build  # both put back after the load
    enc = tokenizer([" ".join(CORPUS)], return_tensors="pt")
    with torch.no_grad():
        want_logits = source(**enc).logits
        assert float((loaded(**enc).logits - want_logits).norm() / want_logits.norm()) <= REL["f16"]
    cfg.rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                           "original_max_position_embeddings": 64}
    cfg.save_pretrained(tmp_path / "l3")
    assert cli.main(["export", str(tmp_path / "l3"), "--output", str(tmp_path / "y.gguf")]) == 2


def split_tokenizer(regex: str):
    """A byte-level BPE whose pre-tokenizer splits with `regex` first, as Llama-3's and Qwen2's do."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    extra = ["12345 678 9012", "345 345 3456", "a-fox b-fox c-fox"]  # digit runs, a mark joined to a word
    tok.train_from_iterator(CORPUS * 20 + extra * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.mark.parametrize("pre", ["llama-bpe", "qwen2"])
def test_pre_tokenizer_named_so_digits_split_the_same(pre, tmp_path):
    """Llama-3 cuts digit runs after 3 ("123" "45"), Qwen2 joins a mark to the word after it ("-fox"); GPT-2
    does neither (measured: without the name, transformers reads "12" "345" and "-" "fox"). The file must
    name the split (tokenizer.ggml.pre) for the merges to apply to the same pieces."""
    regex = {name: r for r, name in gguf_mod.SPLITS.items()}[pre]
    tok = split_tokenizer(regex)
    tiny_model(len(tok), "llama").save_pretrained(tmp_path / pre)
    tok.save_pretrained(tmp_path / pre)
    result = gguf_mod.write_gguf(tmp_path / pre, tmp_path / "t.gguf", "f16", log=quiet)
    assert result["pre"] == pre
    _, back = load_gguf(tmp_path / "t.gguf")
    for text in ["x 12345 678 9012, the d-fox"] + CORPUS:
        assert back(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_smollm_pre_tokenizer_is_named_smollm():
    state = {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}
    assert gguf_mod.pre_tokenizer_name(state) == "smollm"
    assert gguf_mod.pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt2"
    odd = {"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "[a-z]+"}}}
    assert gguf_mod.pre_tokenizer_name(odd) == "default"
