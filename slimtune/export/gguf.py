"""Write a GGUF file for llama.cpp and Ollama from a merged transformers folder (`slimtune export` merges a run
folder first: export/to_gguf.py).

Plain Python: the `gguf` package's writer and numpy, no llama.cpp build. The merged folder is read tensor by
tensor from its safetensors. The file holds:
- the weights under llama.cpp's names (gguf.TensorNameMap), Q/K rows permuted for the `llama` arch as
  llama.cpp's convert_hf_to_gguf.py does (its RoPE pairs dimension i with i+1, transformers' with i+d/2);
  experts stacked (export/gguf_experts.py), Gemma 3's norms as 1 + w (export/gguf_gemma.py);
- the tokenizer (BPE vocab and merges, byte-level "gpt2" or SentencePiece-style "llama"), token types
  (special = CONTROL), BOS/EOS/PAD/UNK, the end-of-turn (eot/eom) ids the run stops on, its chat template;
- RoPE: the base, and for Llama-3.1+ ("llama3" scaling) the rope_freqs tensor llama.cpp divides each frequency
  by; non-default rope_parameters also as JSON under slimtune.rope_parameters, which models.load_gguf applies
  (transformers' GGUF reader builds default RoPE for llama). yarn, dynamic and longrope are refused.

Quant types (--quant): f16, bf16, q8_0 (gguf.quants), q4_0 and q4_k_m (export/quants.py: scales fit to an
importance matrix of the run's records, export/imatrix.py, as llama.cpp's imatrix path). 1-D tensors stay F32.
The q4_k_m mix follows llama.cpp's llama_tensor_get_type: Q4_K except Q6_K for output.weight (token_embd.weight
when tied) and for attn_v / ffn_down in the layers `_more_bits` picks (the first and last eighth and every third
between). q4_0 also writes the output matrix as Q6_K. A row length the type's block does not divide falls back as
llama.cpp's does: Q4_K -> Q5_0, Q6_K -> Q8_0, a 32-block type -> F16 (SmolLM2's hidden size 576).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .. import config as config_mod
from ..data.templates import stop_ids as template_stops
from . import ExportError, gguf_experts, gguf_gemma
from . import imatrix as imatrix_mod
from . import quants as kquants

QUANTS = ("f16", "bf16", "q8_0", "q4_0", "q4_k_m")
IMATRIX_QUANTS = ("q4_0", "q4_k_m")  # llama.cpp's Q8_0 ignores an importance matrix; f16/bf16 round only
# transformers model_type -> llama.cpp architecture; Mistral is written as llama, as llama.cpp does
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", **gguf_experts.ARCHS,
         **gguf_gemma.ARCHS}
PERMUTED = {"llama"}  # archs whose Q/K rows llama.cpp expects interleaved
ROPE_KEY = "slimtune.rope_parameters"  # the model's rope_parameters as JSON, where they are not the default


def _types():
    from gguf import GGMLQuantizationType as T, LlamaFileType as F

    main = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_k_m": T.Q4_K}
    files = {"f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0, "q4_0": F.MOSTLY_Q4_0,
             "q4_k_m": F.MOSTLY_Q4_K_M}
    return T, main, files


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's use_more_bits: which layers' attn_v / ffn_down q4_k_m keeps at 6 bits."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def pick_type(quant: str, gguf_name: str, shape: tuple[int, ...], n_layers: int, tied: bool):
    """The ggml type one tensor is written in, after llama.cpp's block-size fallbacks."""
    T, main, _ = _types()
    if len(shape) < 2:
        return T.F32
    kind = gguf_name.split(".")[-2].removesuffix("_exps")  # ffn_down_exps as ffn_down, as llama.cpp's name.find
    is_output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
    qtype = main[quant]
    if quant in ("q4_0", "q4_k_m") and is_output:
        qtype = T.Q6_K
    elif quant == "q4_k_m" and kind in ("attn_v", "ffn_down") and _more_bits(int(gguf_name.split(".")[1]), n_layers):
        qtype = T.Q6_K
    cols = shape[-1]
    if qtype in (T.Q4_K, T.Q6_K) and cols % 256:
        qtype = T.Q5_0 if qtype == T.Q4_K else T.Q8_0
    if qtype in (T.Q8_0, T.Q4_0, T.Q5_0) and cols % 32:
        qtype = T.F16
    return qtype


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of each head from transformers' half-split RoPE order to llama.cpp's interleaved order."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope(cfg) -> tuple[dict, float]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    params = params.get("full_attention", params)  # per layer type (Gemma 3): llama.cpp's base is the global one
    kind = params.get("rope_type", params.get("type")) or "default"
    if kind not in ("default", "linear", "llama3"):
        raise ExportError(f"config.json: rope type {kind!r} is not written by slimtune's GGUF export yet (default, "
                          "linear and llama3 are); convert this model with llama.cpp's convert_hf_to_gguf.py")
    return params, float(params.get("rope_theta", getattr(cfg, "rope_theta", None)) or 10000.0)


def rope_freqs(cfg) -> np.ndarray | None:
    """Llama-3.1+ RoPE as llama.cpp reads it: a rope_freqs tensor of per-frequency divisors, the default
    inverse frequencies over the llama3-scaled ones (transformers' own function computes the latter)."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params, theta = _rope(cfg)
    if (params.get("rope_type") or params.get("type")) != "llama3":
        return None
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    return (default / scaled.double()).float().numpy()


def check_arch(model_type: str, where: str) -> str:
    """llama.cpp's architecture name for a transformers model_type, or a clear refusal."""
    if model_type not in ARCHS:
        raise ExportError(f"{where}: model_type {model_type!r} cannot be exported to GGUF by slimtune; supported: "
                          f"{', '.join(sorted(ARCHS))} (for others use llama.cpp's convert_hf_to_gguf.py)")
    return ARCHS[model_type]


def _hparams(w, cfg, arch: str, quant: str) -> None:
    _, _, files = _types()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(getattr(cfg, "num_key_value_heads", None) or heads)
    params, theta = _rope(cfg)
    w.add_rope_freq_base(theta)
    if (params.get("rope_type") or params.get("type")) not in (None, "default"):
        # transformers' GGUF reader knows no rope scaling for llama: models.load_gguf restores it from here
        w.add_string(ROPE_KEY, json.dumps(params))
    if (params.get("rope_type") or params.get("type")) == "linear":
        from gguf import RopeScalingType

        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(params["factor"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // heads:  # Qwen3: heads wider than hidden/heads
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_file_type(files[quant])
    for extra in (gguf_experts, gguf_gemma):
        extra.hparams(w, cfg)


def _source_tensors(folder: Path):
    """(name, float32 numpy) for every tensor of the folder's safetensors, one at a time."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder}: no *.safetensors weights; give a folder written by `slimtune merge` "
                          "or save_pretrained")
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                yield name, fh.get_tensor(name).float().numpy()


def _add_tensors(w, folder: Path, cfg, arch: str, quant: str, imat: imatrix_mod.Imatrix | None) -> dict:
    from gguf import MODEL_ARCH, get_tensor_name_map

    n_layers, tied = cfg.num_hidden_layers, bool(getattr(cfg, "tie_word_embeddings", False))
    names = get_tensor_name_map(MODEL_ARCH[arch.upper()], n_layers)
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    counts: dict[str, int] = {}
    freqs = rope_freqs(cfg)
    if freqs is not None:  # Llama-3.1+: llama.cpp divides each RoPE frequency by these
        w.add_tensor("rope_freqs.weight", freqs)
        counts["F32"] = 1
    for name, data in gguf_experts.stacked(_source_tensors(folder), gguf_experts.per_layer(cfg), str(folder)):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # recomputed by llama.cpp / the same matrix as token_embd
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ExportError(f"{folder}: tensor {name} has no llama.cpp name for arch {arch}; this model "
                              "differs from the architectures slimtune exports")
        if arch in PERMUTED and name.endswith(("q_proj.weight", "k_proj.weight")):
            data = permute_qk(data, heads if "q_proj" in name else kv)
        data = gguf_gemma.tensor(arch, name, data)
        qtype = pick_type(quant, new, data.shape, n_layers, tied)
        columns = imat.columns.get(name) if imat else None  # Q/K permutes rows: the columns stay put
        raw = None if qtype.name in ("F32", "F16") else qtype
        w.add_tensor(new, kquants.encode(data, qtype, columns), raw_dtype=raw)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


# pre-tokenizer regexes llama.cpp knows by name (tokenizer.ggml.pre): its split must match the merges
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


def _walk(node: object):
    """Every component of a tokenizer.json pre_tokenizer (Sequence nests them)."""
    if isinstance(node, dict):
        yield node
        for child in node.get("pretokenizers") or []:
            yield from _walk(child)


def pre_tokenizer_name(state: dict) -> str:
    """llama.cpp's name for how a byte-level BPE tokenizer splits text before merging."""
    parts = list(_walk(state.get("pre_tokenizer")))
    for part in parts:
        if part.get("type") == "Split":
            pattern = part.get("pattern", {})
            regex = pattern.get("Regex") or pattern.get("String")
            return SPLITS.get(regex, "default")
    kinds = {p.get("type") for p in parts}
    if "Digits" in kinds and any(p.get("individual_digits") for p in parts):
        return "smollm"  # SmolLM/SmolLM2: GPT-2's split with every digit alone
    return "gpt2"


def vocab(tokenizer, n_vocab: int) -> dict:
    """The tokenizer as llama.cpp's metadata: model, pre, tokens by id, types, merges (and scores)."""
    from gguf import TokenType

    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer model {model.get('type')!r}: slimtune's GGUF export writes BPE tokenizers "
                          "(GPT-2 byte-level, Llama-3, Qwen, SmolLM2, SentencePiece-BPE); convert this one with "
                          "llama.cpp's convert_hf_to_gguf.py")
    spm = bool(model.get("byte_fallback"))  # SentencePiece-style BPE (Llama-2, Mistral): "▁" and <0xNN>
    size = max(n_vocab, len(tokenizer))
    tokens = [f"[PAD{i}]" for i in range(size)]  # ids the model has but the tokenizer never emits
    types = [int(TokenType.UNUSED)] * size
    def is_byte(text: str) -> bool:  # <0xNN>: SentencePiece's byte fallback, listed as added tokens or not
        return spm and len(text) == 6 and text.startswith("<0x") and text.endswith(">")

    for text, i in model["vocab"].items():
        if i < size:
            tokens[i] = text
            types[i] = int(TokenType.BYTE if is_byte(text) else TokenType.NORMAL)
    for added in state.get("added_tokens", []):
        i, text = added["id"], added["content"]
        if i < size:
            tokens[i] = text
            kind = TokenType.CONTROL if added["special"] else TokenType.USER_DEFINED
            types[i] = int(TokenType.BYTE if is_byte(text) else kind)
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id < size:
        types[tokenizer.unk_token_id] = int(TokenType.UNKNOWN if spm else types[tokenizer.unk_token_id])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return {"model": "llama" if spm else "gpt2", "pre": "default" if spm else pre_tokenizer_name(state),
            "tokens": tokens, "types": types, "merges": merges,
            "scores": [-float(i) for i in range(size)] if spm else None}  # spm: earlier ids merge first


def stop_ids(folder: Path, tokenizer) -> list[int]:
    """Token ids generation stops on: generation_config's eos ids (merge writes the template's stop
    tokens there), the tokenizer's EOS, and the end token its chat template writes after an answer."""
    ids: list[int] = []
    gen = folder / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text(encoding="utf-8")).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    ids += template_stops("auto", tokenizer) if tokenizer.chat_template else [tokenizer.eos_token_id]
    return [i for n, i in enumerate(ids) if i is not None and i not in ids[:n]]


def _adds(tokenizer, token_id: Callable[[str], int | None]) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS in front / EOS behind plain text (llama.cpp's add_bos/add_eos)."""
    ids = tokenizer("a")["input_ids"]
    return (token_id("bos") is not None and ids[0] == token_id("bos"),
            token_id("eos") is not None and ids[-1] == token_id("eos") and len(ids) > 1)


def _tokenizer_meta(w, tokenizer, n_vocab: int, stops: list[int]) -> dict:
    voc = vocab(tokenizer, n_vocab)
    w.add_tokenizer_model(voc["model"])
    w.add_tokenizer_pre(voc["pre"])
    w.add_token_list(voc["tokens"])
    w.add_token_types(voc["types"])
    if voc["scores"]:
        w.add_token_scores(voc["scores"])
    if voc["merges"]:
        w.add_token_merges(voc["merges"])

    def token_id(kind: str):
        return getattr(tokenizer, f"{kind}_token_id", None)

    for kind, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                      ("pad", w.add_pad_token_id)):
        if token_id(kind) is not None:
            add(token_id(kind))
    add_bos, add_eos = _adds(tokenizer, token_id)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    turn_end = [i for i in stops if i != token_id("eos")]
    eot = turn_end[0] if turn_end else token_id("eos")  # llama.cpp stops on eot as on eos
    if eot is not None:
        w.add_eot_token_id(eot)
    eom = tokenizer.convert_tokens_to_ids("<|eom_id|>") if "<|eom_id|>" in tokenizer.get_vocab() else None
    if eom is not None:
        w.add_eom_token_id(eom)  # Llama-3.1's end of a tool-call message
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named templates (tool use...): llama.cpp's chat_template.<name> keys
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        w.add_chat_template(template)
    return {"tokenizer": voc["model"], "pre": voc["pre"], "eot": eot, "eom": eom, "stops": stops}


def write_gguf(folder: str | Path, output: str | Path, quant: str = "f16", log: Callable[[str], None] = print,
               name: str = "", imatrix: str | imatrix_mod.Imatrix | None = "auto",
               run_cfg: config_mod.Config | None = None) -> dict:
    """Write a merged transformers folder as one GGUF file; returns what was written and how long it took.
    imatrix (q4_0, q4_k_m): 'auto' (run_cfg's training data, else the demo's), 'off', a records file, or one
    already computed for this folder (imatrix.compute; None: it found no records)."""
    from gguf import GGUFWriter
    from transformers import AutoConfig, AutoTokenizer

    folder, output = Path(folder), Path(output)
    if quant not in QUANTS:
        raise ExportError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    start = time.perf_counter()
    cfg = AutoConfig.from_pretrained(folder)
    arch = check_arch(cfg.model_type, str(folder / "config.json"))
    for extra in (gguf_experts, gguf_gemma):
        extra.check(cfg, str(folder / "config.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".part")  # a half-written file never takes the final name
    w = GGUFWriter(tmp, arch)
    name = name or folder.name
    # transformers' GGUF loader takes general.name "mistral" for its mistral path, which gguf 0.19 cannot map
    w.add_name(name if name != "mistral" else "mistral-model")
    _hparams(w, cfg, arch, quant)
    meta = _tokenizer_meta(w, tokenizer, cfg.vocab_size, stop_ids(folder, tokenizer))
    w.add_quantization_version(2)
    imat = None
    if quant in IMATRIX_QUANTS:
        imat = imatrix_mod.compute(folder, tokenizer, imatrix, run_cfg, log) if isinstance(imatrix, str) else imatrix
        why = "--imatrix off" if imatrix == "off" else "no calibration records"
        log(f"{quant}: " + (imat.describe() if imat else f"no importance matrix ({why}): every column alike"))
    counts = _add_tensors(w, folder, cfg, arch, quant, imat)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(output)
    seconds = time.perf_counter() - start
    size = output.stat().st_size
    log(f"wrote {output} ({arch}, {quant}: {', '.join(f'{n} {t}' for t, n in sorted(counts.items()))} tensors; "
        f"{size / 2**20:.1f} MiB in {seconds:.1f} s); tokenizer {meta['tokenizer']}/{meta['pre']}, stop ids "
        f"{meta['stops']}")
    return {"path": str(output), "arch": arch, "quant": quant, "bytes": size, "seconds": seconds,
            "tensor_types": counts, "imatrix": imat.describe() if imat else None, **meta}
