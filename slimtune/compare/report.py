"""compare's outputs from its rows: compare.json, compare.md, the three charts and compare.html."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..runs.metrics_log import read_metrics
from ..config.batch import records_per_step
from ..evaluate import plots
from . import page, table
from .spec import Comparison

CHARTS = {"loss curves": "loss_curves.png", "score vs training memory": "score_vs_memory.png",
          "score vs training time": "score_vs_time.png"}


def meta(comparison: Comparison, config_path: str, device: str) -> dict:
    tc = comparison.cfg.train
    budget = f"{tc.max_steps} steps" if tc.max_steps else f"{tc.epochs:g} epochs"
    return {"config": str(config_path), "metric": comparison.metric, "device": device, "seed": tc.seed,
            "budget": f"{budget} x {records_per_step(tc)} records, lr {tc.lr:g}", "pairs": comparison.pairs,
            "eval_records": "all" if comparison.pairs else tc.eval_max_records or "all",
            "eval_max_tokens": tc.eval_max_tokens}


def _span(values: set[int]) -> str:
    return f"{min(values):,}" if len(values) == 1 else f"{min(values):,} to {max(values):,}"


def loss_note(rows: list[dict], runs: dict[str, list[dict]], cap: int | None = None) -> str:
    """Which records the loss chart's held-out points score, beside the table's eval loss: in training,
    train.eval_max_tokens caps them to the first held-out records (auto: a share of the run's tokens),
    while the table scores the test's records, so the step-0 point is not the base row's eval loss."""
    during = {r["eval_tokens"] for m in runs.values() for r in m if r.get("eval_tokens")}
    table_tokens = {r["eval_tokens"] for r in rows if r.get("eval_tokens")}
    records = {r["eval_records"] for r in rows if r.get("eval_records")}
    if not during or not table_tokens:
        return ""
    setting = "" if cap is None else f" (train.eval_max_tokens={cap}{': auto' if cap < 0 else ''})"
    if during == table_tokens:
        return (f"Loss chart: the held-out points score the same {_span(during)} answer tokens as the table's "
                "eval loss.")
    return (f"Loss chart: the held-out points are the in-training evals, over {_span(during)} answer tokens of the "
            f"first held-out records{setting}; the table's eval loss is over the test's {_span(records)} records "
            f"({_span(table_tokens)} answer tokens), so the two differ (the step-0 point is not the base row's).")


def curves(rows: list[dict]) -> dict[str, list[dict]]:
    """Each trained row's metrics.jsonl rows."""
    runs = {}
    for r in rows:
        path = Path(r["run_dir"]) / "metrics.jsonl"
        if r.get("status") == "done" and r.get("method") != "base" and path.is_file():
            runs[r["label"]] = read_metrics(path)
    return runs


def charts(out: Path, rows: list[dict], metric: str | None, note: str = "") -> dict[str, Path]:
    """The loss curves of every trained row, and the score against training memory and time."""
    paths = dict(zip(CHARTS, (out / name for name in CHARTS.values())))
    plots.compare_losses(curves(rows), paths["loss curves"], note)
    gpu = table.on_gpu(rows)
    name = "preference accuracy" if table.on_pairs(rows) else table.SCORE_NAMES.get(metric, metric) if metric \
        else "eval loss"
    key = "pref_accuracy" if table.on_pairs(rows) else "score" if metric else "eval_loss"
    value = lambda r: r.get(key)  # noqa: E731
    kind = "GPU reserved" if gpu else "peak RSS"
    base = next((value(r) for r in rows if r.get("method") == "base"), None)
    mem = [(r["label"], table.memory(r, "train", gpu), value(r)) for r in rows if r.get("method") != "base"]
    plots.scatter([p for p in mem if None not in p], paths["score vs training memory"],
                  f"training memory, GiB ({kind})", name, f"{name} vs training memory", base)
    tim = [(r["label"], r.get("train_seconds"), value(r)) for r in rows if r.get("method") != "base"]
    plots.scatter([p for p in tim if None not in p], paths["score vs training time"], "training time, s", name,
                  f"{name} vs training time", base)
    return paths


def write(out: Path, rows: list[dict], info: dict, log: Callable[[str], None] = print) -> None:
    info = {**info, "loss_note": loss_note(rows, curves(rows), info.get("eval_max_tokens"))}
    if info.get("pairs"):  # the pairs scored: every row scores the same held-out file
        info["eval_records"] = next((r["eval_records"] for r in rows if r.get("eval_records")  # kto: 2 a pair
                                     and r.get("scored_as") != "kto"), "all")
    json_path, md_path = table.write(out, rows, info)
    drawn = charts(out, rows, info.get("metric"), info["loss_note"])
    html_path = page.write(out, rows, info, drawn)
    log(f"compare: wrote {json_path}, {md_path}, {html_path} and {len(drawn)} charts in {out}")
