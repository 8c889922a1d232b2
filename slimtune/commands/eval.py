"""`slimtune eval`: loss and perplexity on a test set's answers; with --generate also EM, F1, BLEU-4, ROUGE."""
from __future__ import annotations

from .. import config as config_mod
from ..data.readers import DataError
from ..evaluate.generate import Sampling
from ..evaluate.report import main as eval_main
from ..models import pick_device
from .options import TRUST_HELP
from .run_folder import check_run


def add(ev) -> None:
    ev.add_argument("folder", nargs="?", help="a run folder written by `slimtune train` (or give --base)")
    ev.add_argument("--data", required=True, help="test records (alpaca or messages); the last answer is the reference")
    ev.add_argument("--base", help="evaluate this model with no adapter: folder, .gguf file, or 'embedded'")
    ev.add_argument("--template", choices=config_mod.CHOICES["data.template"],
                    help="with --base: the chat template (default auto); a run uses its own")
    ev.add_argument("--system", help="system prompt (default: the run's data.system)")
    ev.add_argument("--output", help="folder for scores.json and predictions.jsonl (default: FOLDER/eval-<data>)")
    ev.add_argument("--generate", action="store_true", help="generate answers (greedy) and score them")
    ev.add_argument("--extraction", action="store_true", help="also score answers as sets of items "
                                                              "(implies --generate)")
    ev.add_argument("--separator", default="\\n", help="between extraction items (default: newline; \\t = tab)")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--batch-size", type=int, help="records per batch (default: 8; generation 64 on CUDA)")
    ev.add_argument("--max-len", type=int, default=0, help="tokens per record (default: the run's data.max_len)")
    ev.add_argument("--limit", type=int, default=0, help="only the first N records (0 = all)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")


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
