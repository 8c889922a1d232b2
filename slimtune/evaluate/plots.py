"""Charts as PNG files (matplotlib, no display needed): a run's loss.png, and compare's charts.

Figures are built with matplotlib's object API (Figure + its Agg canvas), not pyplot: no global state, no
GUI backend, so a run in a thread or on a headless server draws the same. Every chart is SIZE pixels
(no tight bounding box, which would change the size with the labels).
"""
from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
SIZE = (900, 500)  # pixels of every chart


def _figure():
    from matplotlib.figure import Figure

    fig = Figure(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return path


def curves(rows: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) loss points (step, loss) of metrics.jsonl rows; the last row of a step wins (a resumed
    run logs a step once, but an eval row shares its step with a training row)."""
    train = {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}
    held = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r and "step" in r}
    return sorted(train.items()), sorted(held.items())


def loss_png(metrics: list[dict], path: Path, title: str = "") -> Path:
    """Train loss per step and held-out loss at each eval, on one chart."""
    fig, ax = _figure()
    train, held = curves(metrics)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if held:
        ax.plot(*zip(*held), "o--", label="eval loss", color="tab:orange")
    ax.set(xlabel="optimizer step", ylabel="loss (answer tokens)", title=title or "loss")
    ax.grid(alpha=0.3)
    if train or held:
        ax.legend(loc="upper left")
    _accuracy(ax, metrics)
    return _save(fig, path)


def accuracy_points(rows: list[dict]) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train, eval) preference accuracy points (step, share of pairs whose chosen answer wins) of a preference
    run's metrics.jsonl rows; both empty for an answers run."""
    train = {r["step"]: r["rewards/accuracy"] for r in rows if "rewards/accuracy" in r and "step" in r}
    held = {r["step"]: r["eval_rewards/accuracy"] for r in rows if "eval_rewards/accuracy" in r and "step" in r}
    return sorted(train.items()), sorted(held.items())


def _accuracy(ax, metrics: list[dict]) -> None:
    """A preference run's accuracy on its own 0-1 axis at the right of the loss chart."""
    train, held = accuracy_points(metrics)
    if not (train or held):
        return
    right = ax.twinx()
    if train:
        right.plot(*zip(*train), label="train preference accuracy", color="tab:green", linewidth=1, alpha=0.7)
    if held:
        right.plot(*zip(*held), "s--", label="eval preference accuracy", color="tab:red")
    right.set(ylabel="preference accuracy", ylim=(0, 1.05))
    right.legend(loc="upper right")


def compare_losses(runs: dict[str, list[dict]], path: Path, note: str = "") -> Path:
    """Every method's train loss (line) and eval loss (markers, same colour) on one chart; note: a line
    under it saying which records the eval points score."""
    fig, ax = _figure()
    if note:
        fig.subplots_adjust(bottom=0.2)
        fig.text(0.01, 0.01, "\n".join(textwrap.wrap(note, 150)), fontsize=7, color="#444", va="bottom")
    colors = [f"C{i}" for i in range(10)]
    for i, (label, metrics) in enumerate(runs.items()):
        train, held = curves(metrics)
        color = colors[i % len(colors)]
        if train:
            ax.plot(*zip(*train), color=color, linewidth=1.2, label=label)
        if held:
            ax.plot(*zip(*held), "o--", color=color, markersize=4, linewidth=0.8)
    ax.set(xlabel="optimizer step", ylabel="loss (answer tokens)",
           title="loss per method: train (lines), held-out (dashed, markers)")
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=8, ncol=2)
    return _save(fig, path)


def scatter(points: list[tuple[str, float, float]], path: Path, xlabel: str, ylabel: str, title: str,
            baseline: float | None = None) -> Path:
    """Labelled points (label, x, y): a method's place in a trade-off such as score vs memory; baseline:
    the untrained model's score, as a dashed line."""
    fig, ax = _figure()
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="untrained (base)")
        ax.legend(fontsize=8, loc="lower right")
    for i, (label, x, y) in enumerate(points):
        ax.scatter([x], [y], color=f"C{i % 10}", s=40)
        # staggered offsets: methods with the same score (several at 0) would print their names on top of each other
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5 - 11 * (i % 3)), fontsize=9)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if points:
        ax.margins(0.15)
    return _save(fig, path)
