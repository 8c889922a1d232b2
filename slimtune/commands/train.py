"""`slimtune train`: train an adapter from a YAML config (on N GPUs through torchrun + FSDP2)."""
from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from .. import config as config_mod
from .. import train as training
from ..engine import distributed, split
from ..objectives.rewards import load_user
from .options import allow_code, config_from


def run(args: argparse.Namespace) -> int:
    if args.help_config:  # before the config is read: help must work while a config is broken
        print(config_mod.explain())
        return 0
    cfg = config_from(args)
    allow_code(args, cfg)  # before anything loads: a run folder's config.yaml never runs the model's own code
    if args.print_config:
        resolved, note = split.for_print(cfg)  # the split the run would use, where no model or GPU is needed
        print(_noted(config_mod.dump(resolved), note), end="")
        return 0
    n = args.gpus or cfg.train.gpus
    if n > 1 and not distributed.launched():
        return _torchrun(n, args.raw)
    protect = (args.config,) if args.config and Path(args.config).is_file() else ()
    rewards = tuple(load_user(spec) for spec in args.reward)  # code named on this command line, never by a file
    try:
        result = training.from_config(cfg, overwrite=args.overwrite, show_progress=not args.no_progress,
                                      resume=args.resume, protect=protect, rewards=rewards)
    finally:
        distributed.close()
    # a stopped run is not a finished one: 128 + the signal number, as a shell reports it, so a
    # scheduler does not record a preempted job as done
    stopped = result.get("interrupted")
    return 128 + signal.Signals[stopped].value if stopped else 0


def _noted(text: str, note: str) -> str:
    """The YAML with `note` as comment lines above train.batch_size (at the top when that is not found)."""
    if not note:
        return text
    lines = text.splitlines(keepends=True)
    train = lines.index("train:\n") if "train:\n" in lines else len(lines)
    at = next((i for i in range(train, len(lines)) if lines[i].startswith("  batch_size:")), None)
    indent = "" if at is None else "  "
    comment = [f"{indent}# {part}\n" for line in note.splitlines() for part in textwrap.wrap(line, 110)]
    at = 0 if at is None else at
    return "".join(lines[:at] + comment + lines[at:])


def _torchrun(gpus: int, argv: list[str]) -> int:
    """`slimtune train ... --gpus N`: the same command under torchrun, N processes on this machine."""
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "slimtune", *rest, f"train.gpus={gpus}"]
    print("slimtune: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd)
