"""Unknown keys: the key meant, by meaning (names from other trainers) first, then by spelling."""
from __future__ import annotations

import difflib

from .convert import fields_of, show, types_of
from .fields import Config

# Names users bring from the transformers Trainer, LLaMA-Factory and axolotl, matched by meaning: by spelling
# alone, train.learning_rate was closest to train.eval_generate.
ALIASES = {
    **dict.fromkeys(("learning_rate", "lr"), "train.lr"),
    **dict.fromkeys(("batch_size", "total_batch_size", "global_batch_size"), "train.batch_size"),
    **dict.fromkeys(("per_device_train_batch_size", "train_batch_size"), "train.micro_batch_size"),
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


def suggest(key: object, section: str, known: list[str]) -> str | None:
    """The dotted key (or section) meant by an unknown `key` in `section` ("" = the top level)."""
    if not isinstance(key, str):
        return None
    bare = key.strip().lower().replace("-", "_")
    if bare in ALIASES:
        return ALIASES[bare]
    owners = [f"{s}.{bare}" for s in fields_of(Config) if bare in fields_of(types_of(Config)[s])]
    if owners:  # a key of another section, or one given at the top level (output_dir)
        return owners[0]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"{section}.{close[0]}" if close and section else (close[0] if close else None)


def unknown_key(key: object, known: list[str], section: str) -> str:
    """`section.key: unknown key (did you mean ...?)`, by meaning first, then by spelling."""
    meant = suggest(key, section, known)
    prefix = f"{section}." if section else ""
    hint = f" (did you mean {meant}?)" if meant else f" (known: {', '.join(prefix + k for k in known)})"
    return f"{prefix}{key if isinstance(key, str) and key.isprintable() else show(key)}: unknown key{hint}"

