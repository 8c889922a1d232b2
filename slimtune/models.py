"""Load a base model and its tokenizer: a transformers folder, a .gguf file, or the embedded model."""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(path: str) -> Path:
    """The model location: "embedded" resolves to the converted embedded model folder."""
    if path == "embedded":
        from .assets import embedded_model_dir

        return embedded_model_dir()
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"model.path: {p} does not exist (give a transformers model folder, a .gguf "
                                "file, or 'embedded')")
    if p.is_dir() and not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {p} has no config.json; it is not a transformers model folder")
    if p.is_file() and p.suffix != ".gguf":
        raise FileNotFoundError(f"model.path: {p} is a file but not a .gguf file")
    return p


def load_gguf(path: Path, dtype: str = "fp32"):
    """Dequantize a GGUF file into a dense transformers model (needs the `gguf` package)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=DTYPES[dtype])
    _restore_rope(model, path)
    if getattr(model, "hf_quantizer", None) is not None:
        # a GGUF-loaded model refuses save_pretrained until its quantization config is dropped;
        # the weights are already dense, so nothing is lost.
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def _restore_rope(model, path: Path) -> None:
    """RoPE scaling (Llama-3.1+ "llama3", "linear") that slimtune's export stored beside llama.cpp's own
    form: transformers' GGUF reader builds default RoPE, which moves every logit of such a model."""
    import json

    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("slimtune.rope_parameters")
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if field is None or rotary is None:
        return
    model.config.rope_parameters = json.loads(field.contents())
    model.model.rotary_emb = type(rotary)(config=model.config)


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    p = resolve(path)
    if p.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)


def load_config(path: str, trust_remote_code: bool = False):
    """The model's transformers config alone (config.json, or a GGUF file's metadata): no weights read."""
    from transformers import AutoConfig

    p = resolve(path)
    if p.suffix == ".gguf":
        return AutoConfig.from_pretrained(p.parent, gguf_file=p.name)
    return AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)


def load(path: str, dtype: str = "fp32", trust_remote_code: bool = False, device: str = "cpu",
         quantization=None):
    """(model, tokenizer); the model's own code runs only with trust_remote_code. With a bitsandbytes
    quantization config the weights are quantized while loading, straight onto the GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = resolve(path)
    if p.suffix == ".gguf":
        if quantization is not None:
            raise ValueError("model.path: a .gguf model cannot be loaded for qlora; convert it to a folder first")
        model, tokenizer = load_gguf(p, dtype)
        return model.to(device), tokenizer
    tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
    extra = {"quantization_config": quantization, "device_map": {"": device}} if quantization is not None else {}
    model = AutoModelForCausalLM.from_pretrained(p, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                 **extra)
    return (model if quantization is not None else model.to(device)), tokenizer


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA GPU is visible; use train.device=cpu")
    return name
