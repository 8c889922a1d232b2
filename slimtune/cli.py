"""The `slimtune` command: train | inspect | chat | generate | eval | targets | params | estimate | merge | demo
| compare | config | ui.

Each verb's arguments are in slimtune/commands/arguments.py, its work in slimtune/commands/<verb>.py (run(args));
this module parses the command line, runs the chosen verb, and turns every error a user can cause into one line."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from types import ModuleType
from typing import Callable

from .errors import SlimtuneError

# verb: its line in `slimtune --help`, in the order that lists them
COMMANDS = {
    "train": "train an adapter from a YAML config",
    "inspect": "show how records are encoded: prompt (masked) and trained parts",
    "chat": "chat with a trained run, same template as training",
    "generate": "batched answers for a file of prompts",
    "targets": "list a model's Linear/Conv1D modules (LoRA targets), shapes, counts",
    "params": "trainable / total parameters of a config's method, from config.json alone (built on the meta "
              "device, no weights loaded)",
    "estimate": "predicted peak GPU memory of a config, by component, before any run",
    "merge": "merge a run's adapter or trained parts into a plain transformers model",
    "export": "write a run (merged first) or a merged folder as GGUF for llama.cpp / Ollama",
    "eval": "loss and perplexity on the answer tokens of a test set; with --generate also EM, F1, BLEU-4, ROUGE "
            "(and --extraction item-set P/R/F1); on preference pairs, preference accuracy; on prompts with --reward "
            "(or for a GRPO run), the mean reward of its completions",
    "compare": "train and score several methods on the same data, seed and budget: table, charts and a report page",
    "config": "print the resolved config; --explain: every key with its type, default, allowed values and what it "
              "does",
    "demo": "the end-to-end demo on the embedded model and real data",
    "ui": "the local web app: set up, estimate, train, watch, chat and compare in the browser (127.0.0.1:7860)",
}

# subcommands whose dotted overrides may also come after a flag (`train cfg.yaml --no-progress train.lr=2e-3`):
# argparse ends a nargs="*" positional at the first flag, so the rest arrive as unrecognized arguments
TAKES_OVERRIDES = ("train", "params", "estimate", "config")

# (category, message regex) of library warnings that slimtune's own calls trigger and no user can act on;
# each measured on transformers 5.24 + peft 0.21.2. Others (a tied embedding in an adapter...) still show.
KNOWN_NOISE = [
    # peft's PeftModel.__init__ reads model.is_gradient_checkpointing: every train, eval, chat, generate
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
    # peft's prefix_tuning forward passes its prefix as past_key_values (training and eval of prefix runs)
    (FutureWarning, r"`past_key_values` is deprecated and will be removed in version [\d.]+ for `\w+\.forward`"),
]


# (logger, message regex) of library log lines of the same kind. bitsandbytes (the test extra; peft and transformers
# import it wherever it is installed) logs this at import on CPUs with AVX512-BF16: it tried to fetch a CPU matmul
# kernel from a hub, which slimtune never uses (QLoRA trains on CUDA only) and this machine cannot reach.
KNOWN_LOG_NOISE = [
    ("bitsandbytes.backends.cpu.ops", r"Failed to load CPU gemm_4bit_forward from kernels-community"),
    # the same attempt, where the hub counts as offline (no network): the kernels package says it skips its check
    ("kernels._internals.hf_hub", r"Skipping publisher trust check for 'kernels-community/"),
]


class _DropLines(logging.Filter):
    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(str(record.msg))


@contextlib.contextmanager
def quiet_warnings():
    """Hide KNOWN_NOISE and KNOWN_LOG_NOISE for the duration (main wraps every command in it)."""
    filters = [(logging.getLogger(name), _DropLines(pattern)) for name, pattern in KNOWN_LOG_NOISE]
    for logger, f in filters:
        logger.addFilter(f)
    try:
        with warnings.catch_warnings():
            for category, message in KNOWN_NOISE:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, f in filters:
            logger.removeFilter(f)


def command(verb: str) -> ModuleType:
    """The module that runs one verb."""
    # imported by name, only once the command line parsed: the verbs' modules load torch and transformers
    # (6-7 s), which `slimtune <verb> --help` and a mistyped option must not wait for
    return importlib.import_module(f"{__package__}.commands.{verb}")


def arguments(verb: str) -> Callable[[argparse.ArgumentParser], None]:
    """The function that adds one verb's arguments to its parser; it loads no torch or transformers."""
    # imported once a verb is named: `slimtune --help` needs none of them, nor the config they take choices from
    from .commands.arguments import ADD
    return ADD[verb]


def _parser(verb: str | None) -> argparse.ArgumentParser:
    """Every verb with its help line; only `verb` (the chosen one) gets its arguments."""
    p = argparse.ArgumentParser(prog="slimtune", description="Fine-tune language models on small hardware.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in COMMANDS.items():
        verb_parser = sub.add_parser(name, help=help_)
        if name == verb:
            arguments(name)(verb_parser)
    return p


def _parse(argv: list[str]) -> argparse.Namespace:
    # the top level takes no option but --help, so the first word that is not a flag names the verb
    verb = next((a for a in argv if not a.startswith("-")), None)
    parser = _parser(verb if verb in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    odd = [x for x in extra if args.command not in TAKES_OVERRIDES or x.startswith("-")
           or not ("=" in x or Path(x).is_file())]
    if odd:
        parser.error(f"unrecognized arguments: {' '.join(odd)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def main(argv: list[str] | None = None) -> int:
    # expandable segments: far less fragmentation, so reserved memory stays close to allocated (and to
    # `slimtune estimate`); must be set before CUDA initializes
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    # slimtune reads models and data from local paths only; offline, no library fetches from a hub either
    # (bitsandbytes' import asks the kernels package for a CPU kernel from kernels-community on AVX512-BF16 CPUs)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parse(raw)
    args.raw = raw
    where = f" (rank {os.environ.get('RANK')} of {os.environ['WORLD_SIZE']})" \
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        with quiet_warnings():
            return command(args.command).run(args)
    # every error a user can cause is a SlimtuneError (errors.py); a missing or existing path that an
    # open() or mkdir() of a library met is one too, in effect: it names the path
    except (SlimtuneError, FileNotFoundError, FileExistsError) as err:
        print(f"slimtune {args.command}{where}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not where:
            raise
        # torchrun stops the other ranks when one exits non-zero; name the one that failed
        traceback.print_exc()
        print(f"slimtune {args.command}{where}: error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
