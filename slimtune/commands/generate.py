"""`slimtune generate`: batched answers for a file of prompts."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..data import with_system
from ..data.readers import read_prompts
from ..evaluate import generate
from ..trained import load_for_inference
from .inference import check_output, write_atomic


def run(args: argparse.Namespace) -> int:
    check_output(args, args.output, "generate --output", [args.input])
    prompts, raw = read_prompts(args.input)
    model, tokenizer, cfg, device = load_for_inference(args)
    convs = [with_system(p, cfg.data.system) for p in prompts]
    max_len = args.max_len or cfg.data.max_len
    gen = generate.answer_all(model, tokenizer, cfg.data.template, convs, generate.Sampling.from_flags(args),
                              args.batch_size, device, max_len=max_len, show_progress=not args.no_progress)
    out = Path(args.output)
    write_atomic(out, (dict(rec, prediction=ans) for rec, ans in zip(raw, gen.texts)))
    unfinished = sum(not x for x in gen.stopped)
    print(f"wrote {len(gen.texts)} answers to {out}: {gen.new_tokens} new tokens in {gen.seconds:.1f} s "
          f"({gen.tokens_per_s:.1f} tokens/s on {device}); {unfinished} hit --max-new-tokens={args.max_new_tokens}; "
          f"{gen.truncated} prompts cut to their last {max_len} tokens (--max-len)")
    return 0
