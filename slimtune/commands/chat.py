"""`slimtune chat`: chat with a trained run (or a .gguf file), same template as training."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..evaluate import decode, generate
from ..trained import load_for_inference
from .inference import check_output, write_atomic

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase


def run(args: argparse.Namespace) -> int:
    if args.save:
        check_output(args, args.save, "chat --save")
    model, tokenizer, cfg, device = load_for_inference(args)
    system = args.system or cfg.data.system
    chat_loop(model, tokenizer, cfg.data.template, device, generate.Sampling.from_flags(args), system,
              save=Path(args.save) if args.save else None)
    return 0


def chat_loop(model: nn.Module, tokenizer: PreTrainedTokenizerBase, template: str, device: str,
              sampling: generate.Sampling, system: str = "", read: Callable[[str], str] | None = None,
              save: Path | None = None) -> list[dict]:
    """Read a line (with `read`, default input()), answer it, until /exit, Ctrl-D or Ctrl-C at the prompt;
    returns the conversation. Ctrl-C while an answer is generated drops that answer and its question and
    goes back to the prompt. Each answer gets a new streamer: one stopped by Ctrl-C keeps that answer's
    tokens and takes the next prompt for answer text (the next answer was printed after a U+FFFD and an
    echo of its prompt)."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    earlier: list[list[dict]] = []  # conversations ended by /reset, kept in the transcript
    print("chat with the trained model; /reset clears the history, /exit (or Ctrl-D, Ctrl-C) quits; Ctrl-C during "
          "an answer stops it", file=sys.stderr)
    while True:
        try:
            line = (read or input)("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            earlier += [history] if any(m["role"] == "assistant" for m in history) else []
            history = history[:1] if system else []
            print("[history cleared: the next question starts a new conversation"
                  + (", with the same system prompt]" if system else "]"), file=sys.stderr)
            continue
        if not line.strip():
            continue
        print("assistant> ", end="", flush=True)
        try:
            gen = generate.answer_all(model, tokenizer, template, [history + [{"role": "user", "content": line}]],
                                      sampling, 1, device, streamer=decode.printer(tokenizer))
        except KeyboardInterrupt:
            print("\n[stopped: this answer and its question are left out of the conversation]", file=sys.stderr)
            continue
        print(f"[{gen.new_tokens} tokens, {gen.tokens_per_s:.1f} tokens/s]", file=sys.stderr, flush=True)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": gen.texts[0]}]
        if save:
            write_atomic(save, [{"messages": conv} for conv in earlier + [history]])
    turns = sum(m["role"] == "assistant" for conv in earlier + [history] for m in conv)
    print(f"transcript ({turns} answers) saved to {save}" if save else
          "transcript not saved (--save FILE keeps it)", file=sys.stderr)
    return history
