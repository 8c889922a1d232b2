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
      objectives:                    # optional: train.objective per row, a list or names -> dotted overrides
        sft:                         # on pairs: trained on the chosen answers
        dpo: {preference.beta: 0.1}
        orpo:

`slimtune compare CONFIG --methods a,b` picks rows by label (a method name needs no entry); `--objectives
sft,dpo,orpo` gives a row per objective (of the config's method, or of each method named: labels METHOD-OBJECTIVE).
With preference pairs as data every row is scored on the same held-out pairs (compare/pairs.py).
"""
from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .. import config as config_mod
from .. import trust
from ..config import ConfigError
from ..engine import reference as pref_reference
from . import pairs

BASE = "base"  # the untrained model's row
METRICS = ("extraction_f1", "f1", "em", "rougeL", "rouge1", "rouge2", "bleu4")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a row's label names its folders


@dataclass
class Row:
    label: str
    method: str  # method.name, or BASE
    overrides: list[str]  # dotted key=value, as `slimtune train` takes them
    objective: str | None = None  # train.objective of this row; None: the config's
    data: list[str] = field(default_factory=list)  # data.* overrides the runner adds (an sft row on pairs)


@dataclass
class Comparison:
    cfg: config_mod.Config  # the shared config, command-line overrides applied, before any row's own
    rows: list[Row]
    metric: str | None  # a key of scores.json, or None: eval loss only
    pairs: bool = False  # data.train holds preference pairs: every row is scored on the held-out pairs

    def objective(self, row: Row) -> str:
        """The row's train.objective ("sft" for the untrained model)."""
        return "sft" if row.method == BASE else row.objective or self.cfg.train.objective


def _dotted(value: object) -> str:
    """A YAML value as a command-line override's text (config.py converts it by the field's type)."""
    if isinstance(value, list):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value).lower() if isinstance(value, bool) else str(value)


def _entries(section: dict, where: str, key: str = "methods") -> dict[str, list[str]]:
    """compare.methods (or compare.objectives) as label -> overrides."""
    methods = section.get(key) or {}
    if isinstance(methods, list):
        methods = {str(m): None for m in methods}
    if not isinstance(methods, dict):
        raise ConfigError(f"{where}: compare.{key}: expected a list of names or a mapping of name to overrides")
    out = {}
    for label, body in methods.items():
        if body is not None and not isinstance(body, dict):
            raise ConfigError(f"{where}: compare.{key}.{label}: expected a mapping of dotted overrides like "
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


def _crossed(cfg: config_mod.Config, rows: list[Row], objectives: dict[str, list[str]]) -> list[Row]:
    """Each method row once per objective; the label is the objective when one method is compared, the method
    when one objective is, else METHOD-OBJECTIVE. The untrained model's row stays one row."""
    rows = rows or [Row(cfg.method.name, cfg.method.name, [])]
    trained = [r for r in rows if r.method != BASE]
    out = [r for r in rows if r.method == BASE]
    for r in trained:
        for name, over in objectives.items():
            label = name if len(trained) == 1 else r.label if len(objectives) == 1 else f"{r.label}-{name}"
            out.append(Row(label, r.method, [*r.overrides, *over], name))
    return out


def _where(row: Row) -> str:
    return f"compare.objectives.{row.objective}" if row.objective and row.label == row.objective else \
        f"compare.methods.{row.label}"


def _check_rows(comparison: Comparison, where: str) -> None:
    """Each row's config loads; preference rows need pairs; the untrained model cannot be scored on pairs."""
    for row in comparison.rows:  # each row's config is checked now: a typo must not surface after an hour of runs
        try:
            cfg = load_config(config_mod.to_dict(comparison.cfg), where, row_overrides(row))
            pref_reference.resolve(cfg)  # what `slimtune train` refuses for this objective and method
        except ConfigError as err:
            raise ConfigError(f"{_where(row)}: {err}") from None
        if comparison.pairs and row.method in config_mod.PROMPT_METHODS:
            raise ConfigError(f"{_where(row)}: method.name={row.method}: rows on preference pairs are scored from the "
                              "decoder's hidden states, which the virtual tokens of prompt methods bypass; compare "
                              "them on answers, or use lora")
        if comparison.pairs and row.method == BASE:
            raise ConfigError(f"{where}: compare.methods.base: on preference pairs every row is scored against the "
                              "untrained model (its margins are 0 by definition); leave base out")
        if not comparison.pairs and comparison.objective(row) != "sft":
            raise ConfigError(f"{_where(row)}: train.objective={comparison.objective(row)}: compare scores preference "
                              f"rows on held-out pairs, and {comparison.cfg.data.train} holds none; give pairs "
                              '("prompt", "chosen", "rejected") as data.train')


def load(path: str | Path, methods: list[str] | None = None, overrides: list[str] | None = None,
         objectives: list[str] | None = None) -> Comparison:
    """The comparison of `slimtune compare PATH [overrides] --methods ... --objectives ...`; every row's config is
    validated here, before any run starts."""
    where = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"{where}: config file not found")
    try:
        tree = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as err:  # ValueError: not UTF-8 (UnicodeDecodeError)
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(err).split())}") from None  # one line
    section = (tree.pop("compare", None) or {}) if isinstance(tree, dict) else {}
    if not isinstance(section, dict):
        raise ConfigError(f"{where}: compare: expected a mapping with keys methods, objectives and metric")
    for key in set(section) - {"methods", "objectives", "metric"}:
        raise ConfigError(f"{where}: compare: unknown key {key} (known: methods, objectives, metric)")
    cfg = load_config(tree, where, list(overrides or []))
    trust.decide(cfg, path, trust.said(list(overrides or [])))  # a run folder's config.yaml runs no model code
    entries, goals = _entries(section, where), _entries(section, where, "objectives")
    labels, names = methods or list(entries), objectives or list(goals)
    if not labels and not names:
        raise ConfigError(f"{where}: no methods to compare: pass --methods lora,dora,... or list them under "
                          "compare.methods (or --objectives sft,dpo,...)")
    for flag, given in (("--methods", labels), ("--objectives", names)):
        if len(set(given)) != len(given):
            raise ConfigError(f"{flag}: a label is listed twice: {','.join(given)}")
    rows = [_row(label, entries.get(label, []), where) for label in labels]
    if names:
        for name in names:
            if not _LABEL.match(name):
                raise ConfigError(f"{where}: compare.objectives.{name}: a label names folders: use letters, digits, "
                                  "_ . -")
        rows = _crossed(cfg, rows, {n: goals.get(n, []) for n in names})
    if not (cfg.data.eval or cfg.data.eval_size > 0):
        raise ConfigError(f"{where}: compare scores every method on held-out records: set data.eval, or "
                          "data.eval_size above 0")
    comparison = Comparison(cfg, rows, _metric(section, cfg, where), pairs.holds_pairs(cfg.data))
    _check_rows(comparison, where)
    if comparison.pairs:
        comparison.metric = None  # the pairs' scores (preference accuracy, mean margin) are the test
    return comparison


def row_overrides(row: Row) -> list[str]:
    """What `slimtune train` gets on top of the shared config for this row."""
    if row.method == BASE:
        return []
    return [f"method.name={row.method}", *([f"train.objective={row.objective}"] if row.objective else []),
            *row.overrides]
