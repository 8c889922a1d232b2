"""`slimtune inspect`: how records are encoded, prompt (masked) and trained parts shown apart.

Preference data (pairs with chosen/rejected, or kto's labelled answers; or any data with --objective set to a
preference objective) is shown as prompt / chosen / rejected (completion and label for kto) with token counts
and truncation, and totals over every record: truncated, prompt cut, identical and empty pairs."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .. import config as config_mod
from .. import models
from ..data import encode_examples, read
from ..data.encode import segments
from ..data.pairs import EncodedPair
from ..data.pref_encode import encode_records, special_warning, summary
from ..data.pref_read import peek_kind
from ..data.pref_read import read as read_prefs
from ..data.preference import for_objective
from ..data.templates import check_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def run(args: argparse.Namespace) -> int:
    kind = peek_kind(args.data) if Path(args.data).exists() else ""
    if kind or args.objective not in ("", "sft"):
        return _run_preference(args)
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


def _run_preference(args: argparse.Namespace) -> int:
    """Every record read (a malformed one stops with its error) and encoded; identical and empty pairs (and
    records the template cannot render) are counted and listed, not fatal, so the totals cover the file."""
    kind, records = read_prefs(args.data)
    objective = args.objective if args.objective not in ("", "sft") else ("kto" if kind == "kto" else "dpo")
    records = for_objective(kind, records, objective, args.data)
    tokenizer = models.load_tokenizer(args.model, args.trust_remote_code)
    cfg_data = config_mod.DataConfig(train=args.data, template=args.template, max_len=args.max_len,
                                     system=args.system)
    warning = check_tokens(cfg_data.template, tokenizer, cfg_data.force_template)
    skipped: list[dict] = []
    pairs, stats = encode_records(records, tokenizer, cfg_data, skipped)
    for pair in pairs[: args.n] if args.n else pairs:
        if args.json:
            print(json.dumps({"where": pair.where, "prompt": pair.prompt, "chosen": pair.chosen,
                              "rejected": pair.rejected, "label": pair.label, "truncated": pair.truncated,
                              "prompt_cut": pair.prompt_cut}))
        else:
            _show(pair, tokenizer)
    if not args.json:
        for line in (warning, special_warning(stats, tokenizer, cfg_data), summary(stats, "inspect", args.max_len)):
            if line:
                print(line)
        if skipped:
            print(f"left out {len(skipped)} records; first: {skipped[0]['reason']}")
    return 0


def _show(pair: EncodedPair, tokenizer: PreTrainedTokenizerBase) -> None:
    """One record: a header with the token counts and its truncation, then each part's text, tagged."""
    if pair.paired:
        parts = [("PROMPT", pair.prompt), ("CHOSEN", pair.chosen), ("REJECTED", pair.rejected)]
        counts = f"chosen {len(pair.chosen)} trained, rejected {len(pair.rejected)} trained"
    else:
        parts = [("PROMPT", pair.prompt), ("COMPLETION", pair.chosen)]
        counts = f"completion {len(pair.chosen)} trained, label {str(pair.label).lower()} " \
                 f"({'desirable' if pair.label else 'undesirable'})"
    cut = [f"prompt cut by {pair.prompt_cut} tokens on the left"] * bool(pair.prompt_cut) + \
        ["answers cut on the right"] * pair.answer_cut
    print(f"=== {pair.where}: prompt {len(pair.prompt)} tokens (masked), {counts}"
          + (f"; TRUNCATED: {', '.join(cut)}" if cut else ""))
    width = max(len(tag) for tag, _ in parts)
    for tag, ids in parts:
        text = tokenizer.decode(ids, skip_special_tokens=False)
        print("\n".join(f"{tag:<{width}} | {line}" for line in text.split("\n")))
