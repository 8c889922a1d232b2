"""Value checks of a filled config: choices, numeric ranges, rules between keys (errors), and method.*
fields the chosen method ignores (warnings)."""
from __future__ import annotations

import math
import re
from typing import Any

from .convert import AUTO, fields_of, show, types_of
from .fields import METHODS, PROMPT_METHODS, REWARDS, Config, MethodConfig, TrainConfig

CHOICES = {
    "model.dtype": ("auto", "fp32", "bf16", "fp16"),
    "train.precision": ("auto", "fp32", "bf16", "bf16-pure", "fp16", "fp16-pure"),
    "data.format": ("auto", "alpaca", "messages", "sharegpt"),
    "data.template": ("auto", "llama2", "llama3", "chatglm3", "bloom", "chatml", "gemma3", "phi3", "phi4", "qwen3",
                      "qwen3-thinking"),
    "data.think_history": ("error", "drop", "keep"),
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
    "train.tiled_mlp": ("auto", "on", "off"),
    "train.compile": ("auto", "on", "off"),
    "data.on_bad_record": ("error", "skip"),
    "train.objective": ("sft", "dpo", "ipo", "simpo", "orpo", "kto", "grpo"),
    "grpo.loss_type": ("grpo", "dr_grpo", "dapo"),
    "grpo.scale_rewards": ("group", "batch", "none"),
    "grpo.decode": ("auto", "eager", "compiled"),
    "train.reference": ("auto", "adapter_off", "precomputed", "copy"),
}


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
    "train.batch_size": "[1, inf)",
    "train.grad_accum": "[1, inf)", "train.lr": "(0, inf)", "train.weight_decay": "[0, inf)",
    "train.warmup_steps": "[0, inf)", "train.max_grad_norm": "[0, inf)", "train.seed": "[0, 2**63)",
    "train.log_every": "[1, inf)", "train.eval_every": "[0, inf)", "train.eval_max_records": "[0, inf)",
    "train.profile_step": "[0, inf)",
    "train.eval_max_new_tokens": "[1, inf)", "train.adam_eps": "(0, inf)", "train.save_every": "[0, inf)",
    "train.keep_checkpoints": "[0, inf)", "train.max_skipped_share": "[0, 1]", "train.gpus": "[1, inf)",
    "train.fsdp_prefetch": "[0, inf)", "train.fsdp_reshard": "[0, inf)",
    "data.max_turns": "[0, inf)", "train.eval_max_tokens": "[-1, inf)",
    "preference.beta": "(0, inf)", "preference.label_smoothing": "[0, 0.5)", "preference.simpo_gamma": "[0, inf)",
    "preference.orpo_lambda": "[0, inf)", "preference.kto_desirable_weight": "(0, inf)",
    "preference.kto_undesirable_weight": "(0, inf)",
    "grpo.num_generations": "[2, inf)", "grpo.max_new_tokens": "[1, inf)", "grpo.temperature": "(0, inf)",
    "grpo.top_p": "(0, 1]", "grpo.steps_per_generation": "[1, inf)", "grpo.epsilon": "[0, 1)",
    "grpo.epsilon_high": "[0, inf)", "grpo.beta": "[0, inf)", "grpo.length_target": "[0, inf)",
    "grpo.length_penalty": "[0, inf)",
}
# what a value outside its range is told, where the interval alone says too little
RANGE_TEXT = {
    "train.max_steps": "must be >= 0 (0 = derived from train.epochs)",
    "method.quant_bits": "must be 4 (NF4) or 8",
    "train.adam_eps": "must be positive (fp16-pure needs >= 1e-4)",
    "train.eval_max_tokens": "must be -1 (auto), 0 (all) or a token count",
}


# AdamW moves each weight by about lr per step whatever the gradient: at 10 one step moves every weight ~10, far
# past its scale (~0.02-1), while fine-tuning takes 1e-6 to 0.3 (prompt tuning). lr=1e38 overflowed AdamW ("value
# cannot be converted to type float") and lr=1e30 trained an adapter that predicts nothing.
LR_MAX = 10.0


def _inside(value: Any, spec: str | tuple) -> bool:
    if isinstance(spec, tuple):
        return value in spec
    lo, hi = ({"inf": math.inf, "2**63": 2 ** 63}.get(x) or float(x) for x in spec[1:-1].split(", "))
    above = value > lo if spec[0] == "(" else value >= lo
    below = value < hi if spec[-1] == ")" else value <= hi
    return above and below


def _range_text(dotted: str, spec: str | tuple) -> str:
    text = {"[1, inf)": "must be at least 1", "[0, inf)": "must be >= 0", "(0, inf)": "must be positive"}
    return RANGE_TEXT.get(dotted) or text.get(spec) or f"must be in {spec}"


def _check_number(dotted: str, value: Any, spec: str | tuple) -> str | None:
    """The problem with one numeric value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return f"{dotted}: must be a finite number, got {value}"
    if isinstance(value, int) and value.bit_length() > 63:
        return f"{dotted}: {show(value)} is beyond 64-bit integers; {_range_text(dotted, spec)}"
    if not _inside(value, spec):
        return f"{dotted}: {_range_text(dotted, spec)}"
    return None


def _check_numbers(cfg: Config) -> list[str]:
    """Every numeric field against RANGES, in field order; the first bad item of a list."""
    problems = []
    for section in fields_of(Config):
        for key in types_of(type(getattr(cfg, section))):
            dotted = f"{section}.{key}"
            if dotted not in RANGES:
                continue
            value = getattr(getattr(cfg, section), key)
            bad = [p for v in (value if isinstance(value, list) else [value])
                   if v != AUTO and (p := _check_number(dotted, v, RANGES[dotted]))]
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
    if cfg.train.lr > LR_MAX:
        problems.append(f"train.lr: {cfg.train.lr:g} is above {LR_MAX:g}: AdamW moves each weight by about lr per "
                        "step, so such an lr only diverges; use 1e-6 to 1e-2 (prompt tuning: up to 0.3)")
    if cfg.train.max_steps == 0 and cfg.train.epochs <= 0:
        problems.append("train.epochs: must be positive (or set train.max_steps)")
    size = cfg.data.eval_size
    if size >= 1 and size != int(size):
        problems.append(f"data.eval_size: {size} is neither a fraction below 1 nor a whole number of records")
    try:
        re.compile(cfg.grpo.format_regex)
    except re.error as err:
        problems.append(f"grpo.format_regex: not a regular expression Python's re reads ({err})")
    return problems + _check_split(cfg.train) + _check_rewards(cfg.grpo.rewards)


def _check_rewards(specs: list[str]) -> list[str]:
    """grpo.rewards: built-in names with an optional weight. A reward written in Python is code, which runs only
    when the person or program starting the run names it (--reward, fit(rewards=...)), never a config file."""
    for spec in specs:
        name, _, weight = spec.partition(":")
        if ".py" in spec or "/" in spec or "\\" in spec:
            return [f"grpo.rewards: {spec!r} names Python code, which a config file never runs; pass it on the command "
                    f"line (--reward {spec}) or to slimtune.fit(rewards=[fn])"]
        if name not in REWARDS:
            return [f"grpo.rewards: {name!r} is not a built-in reward ({', '.join(REWARDS)}); rewards written in "
                    "Python are passed with --reward file.py:fn"]
        try:
            ok = not weight or math.isfinite(float(weight))
        except ValueError:
            ok = False
        if not ok:
            return [f"grpo.rewards: {spec!r}: the weight after ':' must be a finite number, e.g. {name}:0.5"]
    return []


def _check_split(tc: TrainConfig) -> list[str]:
    """train.batch_size against the micro_batch_size x grad_accum a config states (an auto part is free)."""
    batch, micro, accum = tc.batch_size, tc.micro_batch_size, tc.grad_accum
    if batch == AUTO:
        return []
    if micro != AUTO and accum != AUTO and micro * accum != batch:
        return [f"train.batch_size={batch} disagrees with train.micro_batch_size={micro} x train.grad_accum={accum} "
                f"({micro * accum}); set batch_size alone (slimtune picks the split) or make them agree"]
    for key, part in (("micro_batch_size", micro), ("grad_accum", accum)):
        if part != AUTO and batch % part:
            return [f"train.{key}={part} does not divide train.batch_size={batch}; set it to auto (slimtune picks "
                    "the split) or to a divisor of batch_size"]
    return []


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
LORA_FIELDS = ("r", "alpha", "dropout", "target_modules", "bias", "layers_to_transform", "modules_to_save",
               "train_router")
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
    for key in fields_of(MethodConfig):
        value = getattr(m, key)
        if key != "name" and key not in reads and value != getattr(default, key):
            uses = ", ".join(f"method.{k}" for k in reads) or "no other method.* key"
            out.append(f"method.{key}={show(value)} has no effect with method.name={m.name}, which reads {uses}; "
                       f"remove it (perhaps it was set for another method)")
    targets = [t for t in m.target_modules if t != "all-linear" and not t.startswith("re:")]
    if m.name == "ia3" and targets == m.target_modules and targets and \
            not any(t.rsplit(".", 1)[-1] in IA3_FEEDFORWARD for t in targets):
        out.append(f"method.target_modules={', '.join(targets)} with method.name=ia3: IA3 scales only these, no "
                   "feed-forward layer among them (LoRA-style targets, perhaps left from a LoRA config); peft's ia3 "
                   "defaults (k_proj, v_proj, down_proj on Llama-style models) apply with method.target_modules=[]")
    return out

