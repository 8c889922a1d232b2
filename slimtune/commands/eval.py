"""`slimtune eval`: loss and perplexity on a test set's answers; with --generate also EM, F1, BLEU-4, ROUGE."""
from __future__ import annotations

from ..data.readers import DataError
from ..evaluate.generate import Sampling
from ..evaluate.report import main as eval_main
from ..runs.checks import check_run
from ..models import pick_device


def run(args) -> int:
    if args.folder and (args.base or args.template):
        raise DataError("eval: give a run folder, or --base MODEL [--template T], not both (a run uses its "
                        "own model and template)")
    if args.folder:
        check_run(args.folder)
    sep = args.separator.replace("\\n", "\n").replace("\\t", "\t")
    eval_main(args.folder, args.data, base=args.base, template=args.template or "auto", output=args.output,
              generate=args.generate, extraction_sep=sep if args.extraction else None,
              sampling=Sampling(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size,
              device=pick_device(args.device), limit=args.limit, max_len=args.max_len, system=args.system,
              trust_remote_code=args.trust_remote_code, show_progress=not args.no_progress)
    return 0
