"""Load a base model and its tokenizer: a transformers folder, a .gguf file, or the embedded model.

Model folders are untrusted input: their own Python (an `auto_map` in config.json) runs only when the
person at the command line asks (--trust-remote-code, or the config they train with), and pickled
weights load only as plain tensors (torch's weights_only), never running code.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .assets import embedded_folder, embedded_gguf
from .config import ConfigError
from .errors import MismatchError, MissingFileError, SlimtuneError
from .gguf_header import GGUFFileError
from .gguf_header import check as check_gguf
from .gguf_header import reads_once as gguf_reads_once
from .gguf_header import refusals as gguf_refusals

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedTokenizerBase

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
EMBEDDED = "embedded"
# owner/name, as a model hub names a repository: what users copy from a model page
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
TRUST_HINT = ("pass --trust-remote-code (or set model.trust_remote_code: true in the config you train with) "
              "if you trust that code")
_NOTED: set[str] = set()
CONVERT = "convert it to safetensors where you trust its source (load it there, save_pretrained writes safetensors)"


class UnsafeFileError(SlimtuneError, ValueError):
    """A model, adapter or checkpoint file slimtune will not load as it is: custom code without
    --trust-remote-code, or a pickle that holds more than plain tensors."""


def resolve(path: str) -> Path:
    """The model location: "embedded" resolves to the converted embedded model folder."""
    if path == EMBEDDED:
        return embedded_model_dir()
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingFileError(_missing(path, p))
    if p.is_dir() and not (p / "config.json").is_file():
        raise MissingFileError(f"model.path: {p} has no config.json; it is not a transformers model folder")
    if p.is_file() and p.suffix != ".gguf":
        raise MissingFileError(f"model.path: {p} is a file but not a .gguf file")
    return p


def embedded_model_dir() -> Path:
    """A safetensors folder of the embedded model, converted from the GGUF file (assets.embedded_gguf) on first
    use."""
    target = embedded_folder()
    if (target / "model.safetensors").is_file():
        return target
    model, tokenizer = load_gguf(embedded_gguf())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        os.replace(tmp, target)  # atomic: a half-converted folder is never used
    return target


def _missing(path: str, p: Path) -> str:
    if not HUB_ID.fullmatch(path):
        return f"model.path: {p} does not exist (give a transformers model folder, a .gguf file, or 'embedded')"
    return (f"model.path: {path} does not exist here; if it is a model hub id: slimtune never downloads, it loads "
            f"a local transformers folder, a .gguf file or 'embedded'. On a machine with network run `hf download "
            f"{path} --local-dir DIR` (older huggingface_hub: `huggingface-cli download {path} --local-dir DIR`), "
            "copy DIR here and give model.path=DIR")


def loadable_name(path: str) -> str:
    """The name a run's adapter_config.json records for its base, which peft's AutoPeftModel loads: for the
    embedded model its converted folder as an absolute path ("embedded" names nothing outside slimtune, and
    peft would look it up on the model hub), else the path as given. The run's config.yaml keeps "embedded",
    which load_run resolves on any machine."""
    folder = embedded_folder().resolve()
    return str(folder) if path == EMBEDDED or Path(path).expanduser().resolve() == folder else path


def _json(path: Path) -> dict:
    """A JSON object file, or {} when absent or unreadable (transformers names the file when it loads it)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def custom_code(folder: Path) -> list[str]:
    """Where a model folder names its own Python: one 'FILE: auto_map -> module.Class' per file."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        auto_map = _json(Path(folder) / name).get("auto_map")
        if auto_map and isinstance(auto_map, dict):
            refs = {str(r) for v in auto_map.values() for r in (v if isinstance(v, list) else [v]) if r}
            found.append(f"{Path(folder) / name}: auto_map -> {', '.join(sorted(refs))}")
    return found


def check_code(p: Path, trust_remote_code: bool) -> None:
    """Refuse a folder whose model exists only as its own Python, unless trusted. Where transformers has
    the architecture itself (many hub folders keep an auto_map from before it did), its code loads the
    model and the folder's is never run: a warning says so."""
    found = [] if trust_remote_code or not p.is_dir() else custom_code(p)
    if not found:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = _json(p / "config.json").get("model_type")
    if model_type in CONFIG_MAPPING:
        note = (f"warning: {found[0]}: not run; transformers' own {model_type!r} code loads this model instead "
                "(to run the folder's code, pass --trust-remote-code if you trust it)")
        if note not in _NOTED:  # once, though the tokenizer and the model are loaded apart
            _NOTED.add(note)
            print(note, file=sys.stderr)
        return
    raise UnsafeFileError(f"{'; '.join(found)}: model_type {model_type!r} exists only as this folder's own Python, "
                          f"which slimtune runs only when you ask: {TRUST_HINT}")


def pickle_refused(file: Path, err: Exception, advice: str = CONVERT) -> str:
    """One line for a pickle that torch's weights_only load refused: what it held, and what to do (torch's
    own text suggests weights_only=False or allowlisting, both of which would run the pickle's code)."""
    text = str(err)
    name = re.search(r"GLOBAL ([\w.]+)", text)
    detail = re.search(r"WeightsUnpickler error: ([^.\n]*)", text)
    what = (f"it calls {name.group(1)}" if name else detail.group(1) if detail else
            (text.strip().splitlines() or [type(err).__name__])[0])
    return (f"{file}: not plain tensors ({what}); slimtune loads a pickle only as plain tensors and never runs "
            f"code from it: {advice}")


def _bad_pickle(p: Path) -> Path:
    """The pickled weight file a refused load came from (the folder itself when none fails alone)."""
    # transformers reads pytorch_model.bin or its shards; other pickles in the folder are not weights
    files = (sorted(p.glob("pytorch_model*.bin")) or sorted(p.glob("*.bin"))) if p.is_dir() else [p]
    if len(files) == 1:
        return files[0]
    for f in files:
        try:
            torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - any failure marks the culprit; its own error was the load's
            return f
    return p


@contextlib.contextmanager
def refusals(p: Path):
    """transformers' and torch's refusals of an untrusted folder as one line naming the file and what to do
    (torch's own text suggests weights_only=False, which would run the pickle's code)."""
    try:
        yield
    except UnsafeFileError:
        raise
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(pickle_refused(_bad_pickle(p), err)) from None
    except (ValueError, OSError) as err:
        if "trust_remote_code" not in str(err):
            # a folder transformers cannot read (config.json that is not JSON, no model_type, a tokenizer
            # it cannot build) is the user's to fix: one line naming it, not transformers' traceback
            said = " ".join(str(err).split()) or type(err).__name__
            said = said if len(said) <= 300 else said[:297] + "..."
            raise ConfigError(f"model.path: {p}: transformers cannot load it ({said}); give a complete "
                              "transformers model folder (config.json, tokenizer and weights)") from err
        where = "; ".join(custom_code(p)) or f"{p}: custom code"
        raise UnsafeFileError(f"{where}: this model needs its folder's own Python, which slimtune runs only when "
                              f"you ask: {TRUST_HINT}") from None


def load_gguf(path: Path, dtype: str = "fp32") -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file into a dense transformers model (needs the `gguf` package); the file is checked
    first (gguf_header.check) and a model its weights do not fill is refused (check_weights)."""
    from transformers import AutoModelForCausalLM

    metadata = check_gguf(path).metadata  # read once: the tokenizer, expert width and RoPE checks share it
    with gguf_reads_once():  # and transformers parses the file once for the tokenizer, config and weights
        tokenizer = _gguf_tokenizer(path, checked=True)
        with gguf_refusals(path), _no_load_report():
            config = _expert_width(path, metadata)
            model, info = AutoModelForCausalLM.from_pretrained(
                path.parent, gguf_file=path.name, dtype=DTYPES[dtype], trust_remote_code=False,
                output_loading_info=True, ignore_mismatched_sizes=True,
                **({"config": config} if config is not None else {}))
            check_weights(model, info, path)
            _restore_rope(model, path, metadata)
    if getattr(model, "hf_quantizer", None) is not None:
        # a GGUF-loaded model refuses save_pretrained until its quantization config is dropped;
        # the weights are already dense, so nothing is lost.
        model.hf_quantizer.remove_quantization_config(model)
    return model, tokenizer


def _gguf_tokenizer(path: Path, checked: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file describes (checked first unless `checked`), named by the file (its chat
    template's errors name it)."""
    from transformers import AutoTokenizer

    if not checked:
        check_gguf(path)
    with gguf_refusals(path):
        # trust_remote_code=False said outright: left unset, transformers may stop at an interactive [y/N]
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    tokenizer.name_or_path = str(path)
    return tokenizer


def _folded(names: list[str]) -> list[str]:
    """Weight names with their layer numbers folded, as transformers' load report writes them:
    model.layers.{2...31}.mlp.up_proj.weight."""
    groups: dict[str, list[int]] = {}
    for name in names:
        m = re.search(r"\.(\d+)\.", name)
        key = name[:m.start(1)] + "{}" + name[m.end(1):] if m else name
        groups.setdefault(key, []).append(int(m.group(1)) if m else 0)
    out = []
    for key, nums in groups.items():
        nums = sorted(nums)
        if len(nums) == 1:
            span = str(nums[0])
        elif len(nums) > 2 and nums == list(range(nums[0], nums[-1] + 1)):
            span = f"{{{nums[0]}...{nums[-1]}}}"
        else:
            span = "{" + ",".join(map(str, nums)) + "}"
        out.append(key.replace("{}", span, 1))
    return sorted(out)


def _listed(label: str, names: list[str]) -> str:
    folded = _folded(names)
    shown = ", ".join(folded[:6]) + (f" and {len(folded) - 6} more" if len(folded) > 6 else "")
    return f"{len(names)} {label} ({shown})"


def _drop_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _no_load_report():
    """Hide transformers' table of missing, unexpected and mismatched weights: check_weights turns the same
    findings into slimtune's one-line error (and a load with none of them prints no table)."""
    log = logging.getLogger("transformers.modeling_utils")
    log.addFilter(_drop_report)
    try:
        yield
    finally:
        log.removeFilter(_drop_report)


def check_weights(model: torch.nn.Module, info: dict, where: Path) -> None:
    """Refuse a load whose weights do not fill the model: transformers fills a missing weight with random
    values and only prints a report (a GGUF file without block_count ran 2 real layers and 30 random ones).
    Tied weights (lm_head shares embed_tokens) are filled from their source, so they are not missing."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys") or ())
    parts = [_listed(label, names) for label, names in (("missing", missing), ("unexpected", unexpected),
                                                         ("of another shape", mismatched)) if names]
    if parts:
        source = "metadata" if where.suffix == ".gguf" else "config.json"
        raise MismatchError(f"model.path: {where}: the weights do not fit the model its {source} describes: "
                            f"{'; '.join(parts)}; its weights are incomplete or its {source} is wrong: give a "
                            "complete model")


def _expert_width(path: Path, metadata: dict) -> PretrainedConfig | None:
    """The config with each expert's width (llama.cpp's expert_feed_forward_length, from the file's checked
    `metadata`) restored, which transformers' GGUF reader leaves at the class default for Qwen3-MoE (768); None
    where there is nothing to restore."""
    from transformers import AutoConfig

    key = next((k for k in metadata if k.endswith(".expert_feed_forward_length")), None)
    if key is None:
        return None
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
    if not hasattr(config, "moe_intermediate_size"):
        return None
    config.moe_intermediate_size = int(metadata[key])
    return config


def _restore_rope(model: torch.nn.Module, path: Path, metadata: dict) -> None:
    """RoPE scaling (Llama-3.1+ "llama3", "linear") that slimtune's export stored beside llama.cpp's own
    form (in the file's checked `metadata`): transformers' GGUF reader builds default RoPE, which moves every
    logit of such a model."""
    text = metadata.get("slimtune.rope_parameters")
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if text is None or rotary is None:
        return
    rope = json.loads(text) if isinstance(text, str) else text
    if not isinstance(rope, dict):
        raise GGUFFileError(f"{path}: metadata slimtune.rope_parameters is {type(rope).__name__}, not a JSON object; "
                            "export it again")
    model.config.rope_parameters = rope
    model.model.rotary_emb = type(rotary)(config=model.config)


# a tokenizer folder holds at least one of these (fast, sentencepiece, BPE, WordPiece, tiktoken vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "tokenizer_config.json")


def load_tokenizer(path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    p = resolve(path)
    if p.suffix == ".gguf":
        return _gguf_tokenizer(p)
    if not any((p / name).is_file() for name in TOKENIZER_FILES) and not any(p.glob("*.tiktoken")):
        raise MissingFileError(f"model.path: {p} has no tokenizer files (expected one of "
                               f"{', '.join(TOKENIZER_FILES)}); copy them from the model's original folder")
    check_code(p, trust_remote_code)
    with refusals(p):
        return AutoTokenizer.from_pretrained(p, trust_remote_code=bool(trust_remote_code))


def load_config(path: str, trust_remote_code: bool = False):
    """The model's transformers config alone (config.json, or a GGUF file's metadata): no weights read."""
    from transformers import AutoConfig

    p = resolve(path)
    if p.suffix == ".gguf":
        check_gguf(p, tokenizer=False)
        with gguf_refusals(p):
            return AutoConfig.from_pretrained(p.parent, gguf_file=p.name, trust_remote_code=False)
    check_code(p, trust_remote_code)
    with refusals(p):
        return AutoConfig.from_pretrained(p, trust_remote_code=bool(trust_remote_code))


def load(path: str, dtype: str = "fp32", trust_remote_code: bool = False, device: str = "cpu",
         quantization: object | None = None) -> tuple:
    """(model, tokenizer); the model's own code runs only with trust_remote_code. With a bitsandbytes
    quantization config the weights are quantized while loading, straight onto the GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = resolve(path)
    if p.suffix == ".gguf":
        if quantization is not None:
            raise ConfigError("model.path: a .gguf model cannot be loaded for qlora; convert it to a folder first")
        model, tokenizer = load_gguf(p, dtype)
        return model.to(device), tokenizer
    check_code(p, trust_remote_code)
    extra = {"quantization_config": quantization, "device_map": {"": device}} if quantization is not None else {}
    with refusals(p), _no_load_report():
        tokenizer = AutoTokenizer.from_pretrained(p, trust_remote_code=bool(trust_remote_code))
        model, info = AutoModelForCausalLM.from_pretrained(p, dtype=DTYPES[dtype], output_loading_info=True,
                                                           ignore_mismatched_sizes=True,
                                                           trust_remote_code=bool(trust_remote_code), **extra)
    check_weights(model, info, p)
    return (model if quantization is not None else model.to(device)), tokenizer


def pick_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda (or --device cuda), but no CUDA GPU is visible to torch; use cpu or auto")
    return name
