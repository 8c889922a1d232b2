"""`slimtune inspect`: how records are encoded, prompt (masked) and trained parts shown apart."""
from __future__ import annotations

import json

from .. import config as config_mod
from .. import models
from ..data import encode_examples, read
from ..data.encode import segments
from .options import TRUST_HELP


def add(i) -> None:
    i.add_argument("data", help="alpaca JSON/JSONL, messages JSONL, or a save_to_disk folder")
    i.add_argument("--model", default="embedded", help="model folder, .gguf file, or 'embedded'")
    i.add_argument("--template", default="auto", choices=config_mod.CHOICES["data.template"])
    i.add_argument("--json", action="store_true", help="one JSON object per record: input_ids, labels")
    i.add_argument("-n", type=int, default=3, help="records to show (0 = all)")
    i.add_argument("--max-len", type=int, default=100_000)
    i.add_argument("--system", default="", help="default system prompt")
    i.add_argument("--train-on-prompt", action="store_true")
    i.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)


def run(args) -> int:
    examples = read(args.data)
    if args.n:
        examples = examples[: args.n]
    tokenizer = models.load_tokenizer(args.model, args.trust_remote_code)
    cfg_data = config_mod.DataConfig(template=args.template, max_len=args.max_len, system=args.system,
                                     train_on_prompt=args.train_on_prompt)
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
    return 0
