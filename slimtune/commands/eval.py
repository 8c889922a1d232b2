"""`slimtune eval`: loss and perplexity on a test set's answers; with --generate also EM, F1, BLEU-4, ROUGE."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..data.pref_read import peek_kind
from ..data.readers import DataError
from ..evaluate.generate import Sampling
from ..evaluate.report import main as eval_main
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
    if args.folder and _is_pairs(args.data):  # preference pairs: accuracy and mean margin (evaluate/preference.py)
        from ..evaluate import preference

        preference.main(args.folder, args.data, _read_pairs, output=args.output, batch_size=args.batch_size or 8,
                        device=pick_device(args.device), trust_remote_code=args.trust_remote_code)
        return 0
    sep = args.separator.replace("\\n", "\n").replace("\\t", "\t")
    eval_main(args.folder, args.data, base=args.base, template=args.template or "auto", output=args.output,
              generate=args.generate, extraction_sep=sep if args.extraction else None,
              sampling=Sampling(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size,
              device=pick_device(args.device), limit=args.limit, max_len=args.max_len, system=args.system,
              trust_remote_code=args.trust_remote_code, show_progress=not args.no_progress)
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
