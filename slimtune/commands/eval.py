"""`slimtune eval`: loss and perplexity on a test set's answers; with --generate also EM, F1, BLEU-4, ROUGE."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.pref_read import peek_kind
from ..data.readers import DataError
from ..evaluate.generate import Sampling
from ..evaluate.report import main as eval_main
from ..runs.adapter import read_config
from ..runs.checks import check_run
from ..models import pick_device

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import Config
    from ..data.pairs import EncodedPair


def run(args: argparse.Namespace) -> int:
    if args.folder and (args.base or args.template):
        raise DataError("eval: give a run folder, or --base MODEL [--template T], not both (a run uses its "
                        "own model and template)")
    if args.folder:
        check_run(args.folder)
    pairs = bool(args.folder) and _is_pairs(args.data)
    if args.reward or (args.folder and not pairs and Path(args.data).exists()
                       and read_config(args.folder).train.objective == "grpo"):
        return _rewards(args, pairs)  # prompts scored by rewards (evaluate/rewarded.py)
    if pairs:  # preference pairs: accuracy and mean margin (evaluate/preference.py)
        from ..evaluate import preference

        preference.main(args.folder, args.data, _read_pairs, output=args.output, batch_size=args.batch_size or 8,
                        device=pick_device(args.device), trust_remote_code=args.trust_remote_code)
        return 0
    if args.samples != 1 or args.temperature or args.seed is not None:
        raise DataError("eval: --samples, --temperature and --seed sample completions to score with rewards: add "
                        "--reward file.py:fn, or evaluate a GRPO run")
    sep = args.separator.replace("\\n", "\n").replace("\\t", "\t")
    eval_main(args.folder, args.data, base=args.base, template=args.template or "auto", output=args.output,
              generate=args.generate, extraction_sep=sep if args.extraction else None,
              sampling=Sampling(max_new_tokens=args.max_new_tokens or 256), batch_size=args.batch_size,
              device=pick_device(args.device), limit=args.limit, max_len=args.max_len, system=args.system,
              trust_remote_code=args.trust_remote_code, show_progress=not args.no_progress)
    return 0


def _rewards(args: argparse.Namespace, pairs: bool) -> int:
    """Mean rewards of the run's completions of held-out prompts: the run's built-in GRPO rewards and --reward."""
    from ..evaluate import rewarded
    from ..objectives.rewards import load_user

    if not args.folder:
        raise DataError("eval --reward: rewards score a run's completions; give a run folder (not --base)")
    if pairs:
        raise DataError(f"eval --reward: {args.data} holds preference pairs; rewards score completions of prompts "
                        "(prompt, messages or alpaca records)")
    if args.samples > 1 and args.temperature <= 0:
        raise DataError(f"eval --samples {args.samples}: greedy decoding gives one completion per prompt; add "
                        "--temperature (e.g. 1.0) to sample several")
    user = tuple(load_user(spec) for spec in args.reward)  # code named on this command line, never by a file
    cfg = read_config(args.folder)
    how = rewarded.Decoding(samples=args.samples, temperature=args.temperature,
                            max_new_tokens=args.max_new_tokens or cfg.grpo.max_new_tokens,
                            seed=cfg.train.seed if args.seed is None else args.seed)
    rewarded.main(args.folder, args.data, user, how=how, output=args.output, batch_size=args.batch_size or 8,
                  device=pick_device(args.device), max_len=args.max_len, limit=args.limit,
                  trust_remote_code=args.trust_remote_code)
    return 0


def _is_pairs(path: str) -> bool:
    """The file (JSON, JSONL or a saved dataset) holds preference pairs, as the preference readers detect them."""
    return Path(path).exists() and peek_kind(path) == "pairs"


def _read_pairs(cfg: Config, tokenizer: PreTrainedTokenizerBase, path: str) -> list[EncodedPair]:
    """The encoded pairs of `path`, read as a run's data.train with the run's template and max_len."""
    from dataclasses import replace

    from ..data import preference

    data = replace(cfg.data, train=path, eval="", eval_size=0)
    return preference.build_pairs(replace(cfg, data=data), tokenizer, print).train
