"""compare's table: the rows as compare.json and, in the shape of the tutorials' method table, as
compare.md (method, training memory, trainable / total parameters, trainable share, inference memory,
training time, eval loss, test score (on preference pairs: preference accuracy and mean margin), test time,
size)."""
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


def on_pairs(rows: list[dict]) -> bool:
    """Whether the rows were scored on held-out preference pairs (compare/pairs.py)."""
    return any("pref_accuracy" in r for r in rows)


def _number(x: float | None, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _notes(r: dict, pref: bool) -> str:
    if r.get("status") == "failed":
        return f"failed: {r['reason']}"
    if r.get("method") == "base":
        return "untrained model"
    over = ", ".join(r.get("overrides") or [])
    if not pref:
        return over
    scored = r.get("scored_as")
    how = f"{r.get('objective')}" + (f", scored as {scored}" if scored and scored != r.get("objective") else "")
    how += f" (reference: {r['reference']})" if r.get("reference") else ""
    return how + (f"; {over}" if over else "")


def cells(rows: list[dict], metric: str | None) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the table, shared by compare.md and compare.html; on preference pairs two more
    columns after the eval loss: preference accuracy and mean margin."""
    gpu, pref = on_gpu(rows), on_pairs(rows)
    kind = "GPU reserved" if gpu else "peak RSS"
    header = ["Method", f"Training memory ({kind})", "Trainable params", "Total params", "Trainable share",
              f"Inference memory ({kind})", "Training time", "Eval loss", score_header(metric), "Test time",
              "Size", "Notes"]
    if pref:
        header[8:9] = ["Preference accuracy", "Mean margin"]
    body = []
    for r in rows:
        share = r.get("trainable_share")
        scores = [_number(r.get("pref_accuracy"), 3), _number(r.get("pref_margin"), 4)] if pref else \
            [_number(r.get("score"), 3)]
        body.append([r["label"], _gib(memory(r, "train", gpu)), _count(r.get("trainable_params")),
                     _count(r.get("total_params")), "—" if share is None else f"{100 * share:.3f}%",
                     _gib(memory(r, "infer", gpu)), _seconds(r.get("train_seconds")),
                     _number(r.get("eval_loss"), 4), *scores, _seconds(r.get("eval_seconds") or
                                                                     (r.get("eval_wall_seconds") if pref else None)),
                     _size(r.get("artifact_bytes")), _notes(r, pref)])
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
    if meta.get("pairs"):
        test = (f"Test: {meta.get('eval_records', '?')} held-out preference pairs; preference accuracy is the share "
                "of pairs whose chosen answer gets the higher implicit reward, mean margin the mean of chosen minus "
                "rejected reward, each as the row's objective defines its reward (dpo, ipo, kto: beta x the log-ratio "
                "to the reference; simpo: beta x the mean log-probability; orpo: lambda x it; an sft row, trained "
                "on the chosen answers, scored as dpo against its base model), so margins compare within one "
                "objective; eval loss is each row's own objective on the pairs (an sft row's: dpo's); test time is "
                "the eval process's wall time, model load included.")
    else:
        test = (f"Test: {meta.get('eval_records', '?')} held-out records, greedy decoding; test time excludes the "
                "model load.")
    return (f"Device: {meta.get('device', '?')}. Every method in its own process, same data, split, seed and "
            f"budget ({meta.get('budget', '?')}). Training time: the training loop (model load excluded); memory: "
            f"the whole process's peak (model load included). {test} "
            "Size: the saved adapter or trained parameters."
            + (f" {meta['loss_note']}" if meta.get("loss_note") else ""))
