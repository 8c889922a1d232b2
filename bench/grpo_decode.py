"""GRPO step time split (gen_s sampling + scoring, train_s the policy pass) with grpo.decode=eager (transformers'
generate) beside grpo.decode=compiled (static KV cache, compiled one-token step with CUDA graphs), through
`slimtune train` on a random model of a real model's shape (nothing is downloaded: the tokenizer is a small BPE
with added tokens up to the vocabulary size). A random model rarely draws its stop token, so every completion runs
to max_new_tokens: the worst case for sampling.

    python bench/grpo_decode.py --size 0.5b --steps 4            # on the GPU (bash bench/gpu.sh has the wheels)
    python bench/grpo_decode.py --smoke                          # the CPU, seconds: the script runs end to end

One JSON line per decode mode goes to stdout and to $OUT/grpo_decode.jsonl: per-step gen_s and train_s and their
medians over the steps after the first (which holds the compile)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from slimtune import cli  # noqa: E402
from slimtune.engine import decode  # noqa: E402
from slimtune.runs.metrics_log import read_metrics  # noqa: E402

SHAPES = {  # (hidden, intermediate, layers, heads, kv heads, vocab): Qwen2.5-0.5B and Llama-3.2-1B, and a toy
    "smoke": (64, 128, 2, 4, 2, 0),
    "0.5b": (896, 4864, 24, 14, 2, 151936),
    "1b": (2048, 8192, 16, 32, 8, 128256),
}
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
WORDS = ["Paris", "blue", "seven", "the fox", "water", "sleep", "a dog", "health", "river", "stone"]


def tokenizer(vocab: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([f"Say something about {w}. It is {w}." for w in WORDS] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    if vocab > len(fast):
        fast.add_tokens([f"tok{i}" for i in range(vocab - len(fast))])
    return fast


def model_dir(size: str, folder: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, inter, layers, heads, kv, vocab = SHAPES[size]
    tok = tokenizer(vocab)
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                               max_position_embeddings=4096, tie_word_embeddings=True, torch_dtype="bfloat16")
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def run(folder: Path, work: Path, mode: str, args: argparse.Namespace) -> dict:
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say something about {w}.", "answer": w}) + "\n" for w in WORDS))
    tree = {"model": {"path": str(folder)}, "data": {"train": str(data), "max_len": 64},
            "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
            "train": {"objective": "grpo", "output_dir": str(work / mode), "lr": 1e-5, "max_steps": args.steps,
                      "micro_batch_size": args.prompts, "grad_accum": 1, "save_every": 0, "warmup_steps": 0,
                      "device": "cpu" if args.smoke else "auto"},
            "grpo": {"num_generations": args.generations, "max_new_tokens": args.new_tokens, "decode": mode,
                     "rewards": ["length"], "length_target": 8}}
    path = work / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(tree))
    if cli.main(["train", str(path), "--no-progress"]) != 0:
        return {"bench": "grpo_decode", "decode": mode, "failed": True}
    rows = read_metrics(work / mode / "metrics.jsonl")
    gen, train = [r["gen_s"] for r in rows], [r["train_s"] for r in rows]
    later = slice(1, None) if len(rows) > 1 else slice(None)
    return {"bench": "grpo_decode", "decode": mode, "size": args.size, "rows": args.prompts * args.generations,
            "max_new_tokens": args.new_tokens, "gen_s": gen, "train_s": train,
            "gen_s_median": statistics.median(gen[later]), "train_s_median": statistics.median(train[later]),
            "completion_length": statistics.mean(r["completion_length"] for r in rows),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="0.5b", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2, help="prompts a micro-batch (rows = prompts x generations)")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--smoke", action="store_true", help="a toy model on the CPU, 2 steps of 4 tokens")
    args = p.parse_args(argv)
    if args.smoke:
        args.size, args.steps, args.new_tokens, args.generations = "smoke", 2, 4, 2
        decode.BACKEND = "eager"  # the traced graph run as it is: no C++ code generation on the CPU
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_dir(args.size, Path(tmp) / "model")
        for mode in args.modes.split(","):
            row = run(folder, Path(tmp), mode, args)
            print(json.dumps(row))
            with open(out / "grpo_decode.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
