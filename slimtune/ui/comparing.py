"""The Compare page: `slimtune compare` started on the Setup page's config, and its table, loss curves and charts
read from its output folder while rows finish (results/<label>.json is written as each row ends; the charts and
compare.json when all have)."""
from __future__ import annotations

import json
from pathlib import Path

from .. import config as config_mod
from ..compare import report, spec, table
from . import runs

METHODS = "base,lora"  # the rows when the page names none: the untrained model and the default method


def _names(text: str) -> str:
    return ",".join(m.strip() for m in text.split(",") if m.strip())


def _split(names: str | None) -> list[str] | None:
    return names.split(",") if names else None


def start(launcher: runs.Launcher, cfg: config_mod.Config, methods: str, output: Path, objectives: str = "") -> dict:
    """`slimtune compare YAML --methods M [--objectives O] --output DIR` in the background; with objectives and
    no methods, a row per objective of the config's method."""
    launcher.roots.ui.mkdir(parents=True, exist_ok=True)
    yaml_path = launcher.roots.ui / f"{runs.slug(output)}.compare.yaml"
    yaml_path.write_text(config_mod.dump(cfg), encoding="utf-8")
    rows = ["--objectives", _names(objectives)] if _names(objectives) else []
    if _names(methods) or not rows:
        rows = ["--methods", _names(methods or METHODS), *rows]
    named = dict(zip(rows[::2], rows[1::2]))
    try:  # the comparison's errors as `slimtune compare` words them, before anything starts
        spec.load(yaml_path, _split(named.get("--methods")), None, _split(named.get("--objectives")))
    except config_mod.ConfigError as err:
        raise config_mod.ConfigError(str(err).replace(str(yaml_path), "setup")) from None
    return launcher.launch(output, ["compare", str(yaml_path), *rows, "--output", str(output)], "compare")


def _rows(out: Path) -> list[dict]:
    final = out / "compare.json"
    if final.is_file():
        try:
            return json.loads(final.read_text(encoding="utf-8"))["rows"]
        except (OSError, ValueError, KeyError):
            pass
    rows = []
    for path in sorted((out / "results").glob("*.json"), key=lambda p: p.stat().st_mtime):
        if not path.name.endswith(".train.json"):
            try:
                rows.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):  # being written
                continue
    return rows


def state(launcher: runs.Launcher, out: Path) -> dict:
    """The compare's table so far (compare.md's cells), each row's loss curve, the charts drawn, the log tail."""
    rows = _rows(out)
    metric = rows[0].get("metric") if rows else None
    header, body = table.cells(rows, metric)
    curves = {}
    for folder in sorted((out / "runs").glob("[!.]*")) if (out / "runs").is_dir() else []:  # not .slimtune-cache
        points = [[r["step"], r["loss"]] for r in runs.metrics(folder) if "loss" in r]
        if points:  # the base row trains nothing
            curves[folder.name] = points
    charts = {title: str(out / name) for title, name in report.CHARTS.items() if (out / name).is_file()}
    pid = launcher.pid(out)
    return {"folder": str(out), "running": pid is not None, "pid": pid, "header": header, "body": body,
            "curves": curves, "charts": charts, "log": runs.tail(launcher.log_path(out)),
            "done": (out / "compare.json").is_file()}
