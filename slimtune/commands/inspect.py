"""`slimtune inspect`: how records are encoded, prompt (masked) and trained parts shown apart."""
from __future__ import annotations

import json

from .. import config as config_mod
from .. import models
from ..data import encode_examples, read
from ..data.encode import segments


def run(args) -> int:
    examples = read(args.data)
    if args.n:
        examples = examples[: args.n]
    tokenizer = models.load_tokenizer(args.model, args.trust_remote_code)
    cfg_data = config_mod.DataConfig(template=args.template, max_len=args.max_len, system=args.system,
                                     train_on_prompt=args.train_on_prompt, think_history=args.think_history)
    encoded, stats = encode_examples(examples, tokenizer, cfg_data)
    for enc in encoded:
        if args.json:
            print(json.dumps({"where": enc.where, "input_ids": enc.input_ids, "labels": enc.labels}))
            continue
        trained = sum(1 for x in enc.labels if x != -100)
        print(f"=== {enc.where}: {len(enc.input_ids)} tokens, {len(enc.input_ids) - trained} prompt (masked), "
              f"{trained} trained{', TRUNCATED' if enc.truncated else ''}")
        for is_trained, ids in segments(enc.input_ids, enc.labels):
            tag = "TRAINED" if is_trained else "PROMPT "
            text = tokenizer.decode(ids, skip_special_tokens=False)
            print("\n".join(f"{tag} | {line}" for line in text.split("\n")))
    if not args.json:
        print(stats.summary("inspect", args.max_len))
        lines = stats.guards.lines() if stats.guards else []
        print("\n".join(f"GUARD: {line}" for line in lines) if lines else
              f"guards: every record trains its answers and their end tokens (data.template={args.template})")
    return 0
