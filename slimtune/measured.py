"""`python -m slimtune.measured PEAK ARGS...`: the command `slimtune ARGS` run in this process, its peak memory
written to the JSON file PEAK as it exits. compare's child processes (compare/child.run_measured) are this module: it
sits outside the compare package so that a child loads no more than the command it runs, and the peaks it
reports are that command's own."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .cli import main as cli_main
from .runs.signals import die_with_parent

GIB = 2**30


def _peaks() -> dict:
    """This process's peak RSS (Linux) and, when it used CUDA, peak GPU memory allocated and reserved."""
    out = {}
    try:
        status = Path("/proc/self/status").read_text()
        out["rss_gib"] = int(next(x for x in status.splitlines() if x.startswith("VmHWM:")).split()[1]) / 2**20
    except (OSError, StopIteration, ValueError):  # not Linux: the parent falls back to rusage
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
    return out


def main(argv: list[str]) -> int:
    """The child: `slimtune ARGS` in this process, then its peaks into argv[0]."""
    peak_path, args = Path(argv[0]), argv[1:]
    die_with_parent()
    try:
        return cli_main(args)
    finally:
        peak_path.write_text(json.dumps(_peaks()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
