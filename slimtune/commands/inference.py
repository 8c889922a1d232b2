"""What chat and generate share: the run (or .gguf file) loaded to answer, the sampling settings, and JSONL
written atomically (their shared arguments are arguments.inference_args)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .. import config as config_mod
from .. import models, outputs
from ..evaluate.generate import Sampling
from ..export.peft_format import READS, load_run, read_config
from .run_folder import check_run


def load_for_inference(args):
    """(model in eval mode, tokenizer, config, device) of a run folder or an exported .gguf file."""
    device = models.pick_device(args.device)
    if str(args.folder).endswith(".gguf"):  # an exported file: its own chat template, no run config
        model, tokenizer = models.load(args.folder, device=device)
        return model.eval(), tokenizer, config_mod.load(None, [f"model.path={args.folder}"]), device
    check_run(args.folder)
    model, tokenizer, cfg = load_run(args.folder, device, trust_remote_code=args.trust_remote_code)
    return model, tokenizer, cfg, device


def check_output(args, out: str | Path, flag: str, data=()) -> None:
    """Before the model loads: `out` is not the base model, a file of the run or an input (outputs.check)."""
    if str(args.folder).endswith(".gguf"):
        outputs.check(out, flag, args.folder, data)
        return
    check_run(args.folder)
    folder = Path(args.folder)
    runs = [(f"the run's {name}", folder / name) for name in READS]
    outputs.check(out, flag, read_config(folder).model.path, data, reads=runs)


def sampling(args) -> Sampling:
    return Sampling(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def write_atomic(path: Path, rows) -> None:
    """JSONL written to a temporary file beside `path`, renamed over it at the end: a crash leaves no
    half-written file (generate once wrote 2 of 5 rows and then failed) and an old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
