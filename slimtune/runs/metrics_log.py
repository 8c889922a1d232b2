"""Run logs: metrics.jsonl (one JSON object per line), TensorBoard scalars beside it, and the progress bar."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm


def strict_json(row: dict,
                reason: Callable[[str, float], str] = lambda key, value: f"{value} (not a finite number)") -> dict:
    """row with each NaN/inf float as null and why under "null_reasons": JSON has no NaN, and json.dumps'
    bare NaN is refused by strict readers (jq, JavaScript); a null alone would not say what happened.
    reason(key, value) words the why."""
    why: dict = {}

    def clean(value: Any, key: str) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            why[key] = reason(key, value)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{key}.{k}" if key else k) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{key}[{i}]") for i, v in enumerate(value)]
        return value

    out = clean(row, "")
    if why:
        out["null_reasons"] = {**out.get("null_reasons", {}), **why}
    return out


def dumps(row: dict, **kwargs: Any) -> str:
    """The one way slimtune writes a JSON object of numbers: strict JSON, non-finite values as null."""
    return json.dumps(strict_json(row), allow_nan=False, **kwargs)


class MetricsLog:
    def __init__(self, path: Path, truncate_to: int | None = None) -> None:
        """truncate_to: a resumed run cuts the file back to its checkpoint's length, so the steps it
        repeats (and a line half-written when the run was killed) appear once."""
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is not None and path.exists():
            os.truncate(path, min(truncate_to, path.stat().st_size))
        self._fh = path.open("a", encoding="utf-8")

    def write(self, **row: Any) -> None:
        row.setdefault("time", round(time.time(), 3))
        self._fh.write(dumps(row) + "\n")
        self._fh.flush()

    def offset(self) -> int:
        """Bytes written so far: where a resumed run cuts the file."""
        return self._fh.tell()

    def close(self) -> None:
        self._fh.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def tag(key: str) -> str:
    """TensorBoard tag of a metrics key: eval_loss -> eval/loss, lr -> train/lr."""
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"


class RunLog:
    """Each row goes to metrics.jsonl and, as scalars at its step, to TensorBoard event files in the
    same folder (`tensorboard --logdir <output_dir>`)."""

    def __init__(self, out_dir: Path, truncate_to: int | None = None, purge_step: int | None = None,
                 log: Callable[[str], None] = print) -> None:
        self.metrics = MetricsLog(out_dir / "metrics.jsonl", truncate_to)
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:  # a log must never stop a run
            log(f"TensorBoard logs off: {err} (pip install tensorboard)")
            return
        # purge_step: TensorBoard drops the events a killed run wrote after its last checkpoint
        self.tb = SummaryWriter(str(out_dir), purge_step=purge_step, flush_secs=30)

    def write(self, **row: Any) -> None:
        self.metrics.write(**row)
        if self.tb is None or "step" not in row:
            return
        for key, value in row.items():
            if key not in ("step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(tag(key), value, row["step"])

    def offset(self) -> int:
        if self.tb is not None:
            self.tb.flush()  # a checkpoint's events are on disk with it
        return self.metrics.offset()

    def close(self) -> None:
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()


class NullLog:
    """RunLog's stand-in on ranks other than 0 of a multi-process run: rank 0 writes every log."""

    def write(self, **row: Any) -> None:
        pass

    def offset(self) -> int:
        return 0

    def close(self) -> None:
        pass


LABELS = [("em", "EM"), ("f1", "F1"), ("bleu4", "BLEU-4"), ("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"),
          ("rougeL", "ROUGE-L")]  # generation scores, as logs and evaluate/report.py name them


def eval_line(row: dict) -> str:
    """An eval's eval_* row as the run's log prints it."""
    text = f"loss {row['eval_loss']:.4f}" + (f", perplexity {row['eval_ppl']:.3f}" if "eval_ppl" in row else "")
    if "eval_rewards/accuracy" in row:  # preference pairs (evaluate/preference.py)
        text += (f"; preference accuracy {row['eval_rewards/accuracy']:.3f}, mean margin "
                 f"{row['eval_rewards/margins']:.4f}")
    if "eval_em" in row:
        text += "; " + "  ".join(f"{name} {row['eval_' + key]:.2f}" for key, name in LABELS)
    if "eval_extraction_f1" in row:
        text += f"; extraction F1 {row['eval_extraction_f1']:.2f}"
    return text


def step_line(row: dict, steps: int) -> str:
    """One printed line per logged step when the progress bar is off (--no-progress)."""
    return (f"step {row['step']}/{steps}: loss {row['loss']:.4f}, lr {row['lr']:.2e}, "
            f"{row['input_tokens_per_s']:.0f} input tokens/s ({row['trained_tokens_per_s']:.0f} trained), "
            f"{row['elapsed_s']:.1f} s elapsed")


def summary_line(result: dict) -> str:
    """The run in one line: steps, time, final train loss, eval loss (and before), throughput."""
    text = (f"done: {result['steps']} steps in {result.get('train_seconds', 0.0):.1f} s, final train loss "
            f"{result.get('train_loss', float('nan')):.4f}")
    after = result.get("eval_after", {}).get("eval_loss")
    if after is not None:
        before = result.get("eval_before", {}).get("eval_loss")
        text += f", eval loss {after:.4f}" + (f" (before training {before:.4f})" if before is not None else "")
    return text + (f"; {result.get('input_tokens_per_s', 0.0):.0f} input tokens/s "
                   f"({result.get('trained_tokens_per_s', 0.0):.0f} trained)")


def memory_gib(device: str) -> tuple[str, float]:
    """("mem_gib", peak GPU memory allocated) on CUDA, else ("rss_gib", the process's peak resident memory)."""
    if device.startswith("cuda"):
        import torch

        return "mem_gib", torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return "rss_gib", 0.0
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux (bytes on macOS)
    return "rss_gib", kib / (2**30 if sys.platform == "darwin" else 2**20)


def progress(total: int, enabled: bool = True, initial: int = 0, desc: str = "train", unit: str = "step") -> tqdm:
    """A bar on stderr showing done/total, elapsed and remaining time; the caller puts loss, tokens/s and
    memory in its postfix."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, mininterval=0.5)
