"""What a compare runs: the shared training config, and its rows, each a method with its own overrides.

A compare config is a training config with one more top-level section, which compare strips before
anything else reads the file (config.py never sees it):

    compare:
      metric: extraction_f1          # the score column; default: extraction_f1 when train.eval_separator
                                     # is set, f1 when train.eval_generate is on, else none (loss only)
      methods:                       # the rows, in order: a list of names, or names -> dotted overrides
        base:                        # the model untrained: evaluated only, the reference row
        lora:
        prompt_tuning: {train.lr: 3.0e-2}
        freeze: {method.trainable_layers: 2}
        lora_r32: {method.name: lora, method.r: 32}   # a label that is no method name sets method.name

`slimtune compare CONFIG --methods a,b` picks rows by label (a method name needs no entry).
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from .. import config as config_mod
from .. import trust
from ..config import ConfigError

BASE = "base"  # the untrained model's row
METRICS = ("extraction_f1", "f1", "em", "rougeL", "rouge1", "rouge2", "bleu4")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a row's label names its folders


@dataclass
class Row:
    label: str
    method: str  # method.name, or BASE
    overrides: list[str]  # dotted key=value, as `slimtune train` takes them


@dataclass
class Plan:
    cfg: config_mod.Config  # the shared config, command-line overrides applied, before any row's own
    rows: list[Row]
    metric: str | None  # a key of scores.json, or None: eval loss only


def _dotted(value: object) -> str:
    """A YAML value as a command-line override's text (config.py converts it by the field's type)."""
    if isinstance(value, list):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value).lower() if isinstance(value, bool) else str(value)


def _entries(section: dict, where: str) -> dict[str, list[str]]:
    """compare.methods as label -> overrides."""
    methods = section.get("methods") or {}
    if isinstance(methods, list):
        methods = {str(m): None for m in methods}
    if not isinstance(methods, dict):
        raise ConfigError(f"{where}: compare.methods: expected a list of names or a mapping of name to overrides")
    out = {}
    for label, body in methods.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"{where}: compare.methods.{label}: expected a mapping of dotted overrides like "
                              f"{{train.lr: 3.0e-2}}, got {body!r}")
        out[str(label)] = [f"{k}={_dotted(v)}" for k, v in (body or {}).items()]
    return out


def _row(label: str, overrides: list[str], where: str) -> Row:
    if not _LABEL.match(label):
        raise ConfigError(f"{where}: compare.methods.{label}: a label names folders: use letters, digits, _ . -")
    named = [o.split("=", 1)[1] for o in overrides if o.startswith("method.name=")]
    if label == BASE:
        if overrides:
            raise ConfigError(f"{where}: compare.methods.base: the untrained model takes no overrides")
        return Row(label, BASE, [])
    method = named[-1] if named else label
    if method not in config_mod.METHODS:
        raise ConfigError(f"{where}: compare.methods.{label}: {method!r} is no method (known: base, "
                          f"{', '.join(config_mod.METHODS)}); name a method, or set method.name in its overrides")
    return Row(label, method, [o for o in overrides if not o.startswith("method.name=")])


def _metric(section: dict, cfg: config_mod.Config, where: str) -> str | None:
    metric = section.get("metric")
    if metric is None:
        return "extraction_f1" if cfg.train.eval_separator else "f1" if cfg.train.eval_generate else None
    if metric not in METRICS:
        raise ConfigError(f"{where}: compare.metric: {metric!r} is not one of {', '.join(METRICS)}")
    if metric == "extraction_f1" and not cfg.train.eval_separator:
        raise ConfigError(f"{where}: compare.metric: extraction_f1 splits answers on train.eval_separator; set it "
                          '(e.g. "\\n")')
    return metric


def load_config(tree: dict, where: str, overrides: list[str]) -> config_mod.Config:
    """config.load on a tree (the file minus compare:), its messages naming the user's file."""
    fd, tmp = tempfile.mkstemp(suffix=".yaml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yaml.safe_dump(tree, fh, sort_keys=False, allow_unicode=True)
        return config_mod.load(tmp, overrides)
    except ConfigError as err:
        raise ConfigError(str(err).replace(tmp, where)) from None
    finally:
        os.unlink(tmp)


def load(path: str | Path, methods: list[str] | None = None, overrides: list[str] | None = None) -> Plan:
    """The plan of `slimtune compare PATH [overrides] --methods ...`; every row's config is validated here,
    before any run starts."""
    where = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"{where}: config file not found")
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: not UTF-8 (UnicodeDecodeError)
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(err).split())}") from None  # one line
    section = (tree.pop("compare", None) or {}) if isinstance(tree, dict) else {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: compare: expected a mapping with keys methods and metric")
    for key in set(section) - {"methods", "metric"}:
        raise ConfigError(f"{where}: compare: unknown key {key} (known: methods, metric)")
    cfg = load_config(tree, where, list(overrides or []))
    trust.decide(cfg, path, trust.said(list(overrides or [])))  # a run folder's config.yaml runs no model code
    entries = _entries(section, where)
    labels = methods or list(entries)
    if not labels:
        raise ConfigError(f"{where}: no methods to compare: pass --methods lora,dora,... or list them under "
                          "compare.methods")
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--methods: a label is listed twice: {','.join(labels)}")
    rows = [_row(label, entries.get(label, []), where) for label in labels]
    for row in rows:  # each row's config is checked now: a typo must not surface after an hour of runs
        try:
            load_config(config_mod.to_dict(cfg), where, row_overrides(row))
        except ConfigError as err:
            raise ConfigError(f"compare.methods.{row.label}: {err}") from None
    if not (cfg.data.eval or cfg.data.eval_size > 0):
        raise ConfigError(f"{where}: compare scores every method on held-out records: set data.eval, or "
                          "data.eval_size above 0")
    return Plan(cfg, rows, _metric(section, cfg, where))


def row_overrides(row: Row) -> list[str]:
    """What `slimtune train` gets on top of the shared config for this row."""
    return [f"method.name={row.method}", *row.overrides] if row.method != BASE else []
