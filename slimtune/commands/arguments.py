"""Every verb's arguments and help texts, apart from the modules that run the verbs: building a verb's parser
imports nothing heavier than the config's field list, so `slimtune <verb> --help` and a usage error answer
without loading torch or transformers (train --help: 7.4 s median on the 2-core dev machine when the verb's
module built it, 0.14 s from here). tests/test_cli_help.py keeps it so: import nothing heavy here."""
from __future__ import annotations

import argparse

from .. import config as config_mod

EPILOG = "Config overrides use dotted names: slimtune train cfg.yaml train.lr=2e-4 method.r=16"
TRUST_HELP = ("run the model folder's own Python (auto_map in its config.json); only when you trust it. A run "
              "folder's config.yaml never switches this on")


def gpus(text: str) -> int:
    """--gpus: a count of GPUs, at least 1 (0, the default, means train.gpus)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs (1 or more), got {text!r}")
    return n


def add_config(p: argparse.ArgumentParser, config_help: str | None = None, overrides_help: str | None = None) -> None:
    """The YAML file, dotted overrides and --model that options.config_from() reads."""
    p.add_argument("config", nargs="?", help=config_help)
    p.add_argument("overrides", nargs="*", help=overrides_help)
    p.add_argument("--model", help="same as model.path=...")


def inference_args(p: argparse.ArgumentParser) -> None:
    """The arguments of both chat and generate."""
    p.add_argument("folder", help="a run folder written by `slimtune train`, or a .gguf file (`slimtune export`)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.7, help="with --sample")
    p.add_argument("--top-p", type=float, default=0.9, help="with --sample (1 = off)")
    p.add_argument("--top-k", type=int, default=50, help="with --sample (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    p.add_argument("--seed", type=int, help="with --sample: the same seed gives the same answers")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def train_args(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    add_config(p, "YAML config file (optional: defaults + overrides)", "dotted overrides, e.g. train.lr=2e-4")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key (dotted) with its type, "
                   "default, allowed values and what it does, and exit")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in train.output_dir "
                   "(only the files slimtune wrote there are removed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--reward", action="append", default=[], metavar="FILE.py:FN[:WEIGHT]",
                   help="train.objective=grpo: a reward written in Python, fn(prompts, completions, answers) -> "
                   "list[float] (repeatable; the file's code runs: only name files you trust)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in "
                   "train.output_dir (same as train.resume=auto)")
    p.add_argument("--gpus", type=gpus, default=0, help="train on N GPUs of this machine through torchrun + FSDP2 "
                   "(same as train.gpus=N; under torchrun the launcher's process count rules)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP + " (same as "
                   "model.trust_remote_code=true; a config file of your own may set it too)")


def inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", help="alpaca JSON/JSONL, messages JSONL, or a save_to_disk folder; preference pairs "
                   "(chosen/rejected) or kto records (label) are shown as prompt and answers, with totals over all")
    p.add_argument("--model", default="embedded", help="model folder, .gguf file, or 'embedded'")
    p.add_argument("--template", default="auto", choices=config_mod.CHOICES["data.template"])
    p.add_argument("--objective", default="", choices=config_mod.CHOICES["train.objective"],
                   help="show the records as this train.objective reads them (default: by the data; kto unpairs pairs)")
    p.add_argument("--json", action="store_true", help="one JSON object per record: input_ids, labels")
    p.add_argument("-n", type=int, default=3, help="records to show (0 = all)")
    p.add_argument("--max-len", type=int, default=100_000)
    p.add_argument("--system", default="", help="default system prompt")
    p.add_argument("--train-on-prompt", action="store_true")
    p.add_argument("--think-history", default="error", choices=config_mod.CHOICES["data.think_history"],
                   help="reasoning in answers before the last user message, which Qwen3's template drops "
                        "(data.think_history)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def chat_args(p: argparse.ArgumentParser) -> None:
    inference_args(p)
    p.add_argument("--system", default="", help="system prompt for this chat")
    p.add_argument("--save", help="keep the transcript in this JSONL file ({\"messages\": [...]}, as "
                   "training data reads it), rewritten after every answer")


def generate_args(p: argparse.ArgumentParser) -> None:
    inference_args(p)
    p.add_argument("--input", required=True, help="prompts: alpaca records or messages ending with user")
    p.add_argument("--output", required=True, help="JSONL: each input record plus 'prediction'")
    p.add_argument("--batch-size", type=int, help="prompts per batch (default: 64 on CUDA, 8 on the CPU)")
    p.add_argument("--max-len", type=int, default=0, help="prompts longer than this keep their last "
                   "MAX_LEN tokens (default: the run's data.max_len)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def targets_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model folder (config.json is enough), .gguf file, or 'embedded'")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def params_args(p: argparse.ArgumentParser) -> None:
    add_config(p)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def estimate_args(p: argparse.ArgumentParser) -> None:
    add_config(p)
    p.add_argument("--budget", help="GPU memory available, e.g. 24 (GiB), 24GiB or 1500MiB: says whether the run "
                    "fits and what would")
    p.add_argument("--gpus", type=gpus, default=0,
                    help="per-GPU peak of an FSDP2 run over N GPUs (default train.gpus)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a run folder written by `slimtune train`")
    p.add_argument("--output", required=True, help="folder for the merged model")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--overwrite", action="store_true", help="replace the merged model already in --output")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP + " (and copies it into the output "
                    "only then)")


def export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a run folder written by `slimtune train`, or a merged model folder")
    p.add_argument("--format", default="gguf", choices=["gguf", "ollama"],
                    help="ollama: also a Modelfile beside the GGUF (template and stop tokens)")
    p.add_argument("--output", required=True, help="the .gguf file to write")
    p.add_argument("--quant", default="f16", metavar="f16|bf16|q8_0|q4_0|q4_k_m[,...]",
                    help="weight type (1-D tensors stay F32); q4_k_m keeps output and some attn_v/ffn_down at 6 bits; "
                         "several comma-separated share one merge: files named OUTPUT-TYPE.gguf")
    p.add_argument("--imatrix", default="auto", metavar="auto|off|FILE",
                    help="q4_0/q4_k_m: weigh each column's rounding error by its mean squared activation on records "
                         "(auto: the run's training data, for a merged folder the demo's; FILE: records; off: none)")


def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", nargs="?", help="a run folder written by `slimtune train` (or give --base)")
    p.add_argument("--data", required=True, help="test records (alpaca or messages; the last answer is the reference), "
                   "or preference pairs (prompt, chosen, rejected: preference accuracy and mean margin)")
    p.add_argument("--base", help="evaluate this model with no adapter: folder, .gguf file, or 'embedded'")
    p.add_argument("--template", choices=config_mod.CHOICES["data.template"],
                    help="with --base: the chat template (default auto); a run uses its own")
    p.add_argument("--system", help="system prompt (default: the run's data.system)")
    p.add_argument("--output", help="folder for scores.json and predictions.jsonl (default: FOLDER/eval-<data>)")
    p.add_argument("--generate", action="store_true", help="generate answers (greedy) and score them")
    p.add_argument("--extraction", action="store_true", help="also score answers as sets of items "
                                                              "(implies --generate)")
    p.add_argument("--separator", default="\\n", help="between extraction items (default: newline; \\t = tab)")
    p.add_argument("--max-new-tokens", type=int, help="tokens per answer (default 256; with rewards the run's "
                   "grpo.max_new_tokens)")
    p.add_argument("--reward", action="append", default=[], metavar="FILE.py:FN[:WEIGHT]",
                   help="score completions of the prompts with this reward (repeatable; a GRPO run's own built-in "
                   "rewards are always scored; the file's code runs: only name files you trust)")
    p.add_argument("--samples", type=int, default=1, help="with rewards: completions per prompt (default 1)")
    p.add_argument("--temperature", type=float, default=0.0, help="with rewards: 0 = greedy (default), else "
                   "sampling at this temperature, seeded by --seed")
    p.add_argument("--seed", type=int, help="with rewards and --temperature: the sampling seed (default: the run's "
                   "train.seed)")
    p.add_argument("--batch-size", type=int, help="records per batch (default: 8; generation 64 on CUDA)")
    p.add_argument("--max-len", type=int, default=0, help="tokens per record (default: the run's data.max_len)")
    p.add_argument("--limit", type=int, default=0, help="only the first N records (0 = all)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def compare_args(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("config", help="training config; its optional compare: section lists rows and overrides")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every row, e.g. train.max_steps=50")
    p.add_argument("--methods", help="comma-separated rows, e.g. base,lora,dora,freeze,prompt_tuning,full "
                                      "(default: the config's compare.methods; base = the model untrained)")
    p.add_argument("--objectives", help="comma-separated train.objective per row, e.g. sft,dpo,orpo (of the "
                                        "config's method, or of each --methods one); on preference pairs every row "
                                        "is scored on the same held-out pairs (default: compare.objectives)")
    p.add_argument("--output", help="folder for the runs and compare.json/.md/.html (default: "
                                     "compare/<config name>); run again to go on after an interruption")


def config_args(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    add_config(p)
    p.add_argument("--explain", action="store_true", help="the key reference (as `slimtune train --help-config`)")


def demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--output-dir", default="demo_out")
    p.add_argument("--steps", type=int, default=0, help="override the demo's step count")


def ui_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only); "
                   "another one also needs --allow-remote")
    p.add_argument("--allow-remote", action="store_true", help="with --host: serve to other machines; anyone who "
                   "can reach the port can start runs and read files under the working directory (no login)")
    p.add_argument("--runs", default="runs", help="folder for the app's runs (relative to the working directory); "
                   "the app reads and writes only under it and the working directory")


# verb: the function that adds its arguments to its subparser (cli.py builds only the chosen verb's)
ADD = {
    "train": train_args,
    "inspect": inspect_args,
    "chat": chat_args,
    "generate": generate_args,
    "targets": targets_args,
    "params": params_args,
    "estimate": estimate_args,
    "merge": merge_args,
    "export": export_args,
    "eval": eval_args,
    "compare": compare_args,
    "config": config_args,
    "demo": demo_args,
    "ui": ui_args,
}
