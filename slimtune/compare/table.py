"""compare's table: the rows as compare.json and, in the shape of the tutorials' method table, as
compare.md (method, training memory, trainable / total parameters, trainable share, inference memory,
training time, eval loss, test score, test time, size)."""
from __future__ import annotations

import json
from pathlib import Path

SCORE_NAMES = {"extraction_f1": "item-set F1", "f1": "token F1", "em": "exact match", "rougeL": "ROUGE-L",
               "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "bleu4": "BLEU-4 / 100"}


def _gib(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} GiB"


def _seconds(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.1f} s" if x < 600 else f"{x / 60:.1f} min"  # one unit down a column, for runs of minutes


def _count(x: int | None) -> str:
    return "—" if x is None else f"{x:,}"


def _size(n: float | None) -> str:
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def on_gpu(rows: list[dict]) -> bool:
    return any(r.get("train_gpu_reserved_gib") is not None or r.get("infer_gpu_reserved_gib") is not None
               for r in rows)


def memory(row: dict, phase: str, gpu: bool) -> float | None:
    """A row's peak memory for a phase (train | infer): GPU reserved on a GPU, else the process's peak RSS."""
    return row.get(f"{phase}_gpu_reserved_gib") if gpu else row.get(f"{phase}_rss_gib")


def score_header(metric: str | None) -> str:
    """The test-score column's title: the metric's name, or plain "Test score" when none is named."""
    return f"Test {SCORE_NAMES.get(metric, metric)}" if metric else "Test score"


def cells(rows: list[dict], metric: str | None) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the table, shared by compare.md and compare.html."""
    gpu = on_gpu(rows)
    kind = "GPU reserved" if gpu else "peak RSS"
    header = ["Method", f"Training memory ({kind})", "Trainable params", "Total params", "Trainable share",
              f"Inference memory ({kind})", "Training time", "Eval loss", score_header(metric), "Test time",
              "Size", "Notes"]
    body = []
    for r in rows:
        share = r.get("trainable_share")
        notes = f"failed: {r['reason']}" if r.get("status") == "failed" else \
            ("untrained model" if r.get("method") == "base" else ", ".join(r.get("overrides") or []))
        body.append([r["label"], _gib(memory(r, "train", gpu)), _count(r.get("trainable_params")),
                     _count(r.get("total_params")), "—" if share is None else f"{100 * share:.3f}%",
                     _gib(memory(r, "infer", gpu)), _seconds(r.get("train_seconds")),
                     "—" if r.get("eval_loss") is None else f"{r['eval_loss']:.4f}",
                     "—" if r.get("score") is None else f"{r['score']:.3f}", _seconds(r.get("eval_seconds")),
                     _size(r.get("artifact_bytes")), notes])
    return header, body


def markdown(rows: list[dict], metric: str | None) -> str:
    header, body = cells(rows, metric)
    esc = [[c.replace("|", "\\|").replace("\n", " ") for c in row] for row in body]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in esc]) + "\n"


def write(out: Path, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    """compare.json (meta + every row's numbers) and compare.md (the table)."""
    (out / "compare.json").write_text(json.dumps({**meta, "rows": rows}, indent=2, ensure_ascii=False, default=str)
                                      + "\n", encoding="utf-8")
    text = f"# slimtune compare: {meta.get('config', '')}\n\n{markdown(rows, meta.get('metric'))}\n{legend(meta)}\n"
    (out / "compare.md").write_text(text, encoding="utf-8")
    return out / "compare.json", out / "compare.md"


def legend(meta: dict) -> str:
    """What the columns measured, under the table."""
    return (f"Device: {meta.get('device', '?')}. Every method in its own process, same data, split, seed and "
            f"budget ({meta.get('budget', '?')}). Training time: the training loop (model load excluded); memory: "
            "the whole process's peak (model load included). Test: "
            f"{meta.get('eval_records', '?')} held-out records, greedy decoding; test time excludes the model load. "
            "Size: the saved adapter or trained parameters."
            + (f" {meta['loss_note']}" if meta.get("loss_note") else ""))
