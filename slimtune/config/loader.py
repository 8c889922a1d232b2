"""Loading: a YAML file (duplicate keys refused) and dotted command-line overrides fill a Config, then every
problem is raised at once."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from .aliases import suggest, unknown_key
from .checks import validate
from .convert import ConfigError, check_value, convert, fields_of, show, types_of
from .fields import Config


class _Duplicate(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping: plain YAML keeps the last one silently,
    so a second `train:` section replaced the first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may re-set keys: that is its job
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _Duplicate(f"line {line}: {show(key)} is given twice (first on line {seen[key]}), and "
                                     "YAML would keep only the last; remove one")
                seen[key] = line
            except TypeError:  # an unhashable key: SafeLoader's own error names it
                continue
        return super().construct_mapping(node, deep)

    def construct_plain_number(self, node: yaml.ScalarNode) -> object:
        """YAML 1.1 reads 1_0 as 10 (and 1_0.5 as 10.5): such a number stays its text, which the field's check
        refuses (convert.odd_number)."""
        if "_" in node.value:
            return self.construct_scalar(node)
        return self.yaml_number[node.tag](self, node)

    yaml_number = {tag: yaml.SafeLoader.yaml_constructors[tag]
                   for tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")}


for _tag in _UniqueKeyLoader.yaml_number:
    _UniqueKeyLoader.add_constructor(_tag, _UniqueKeyLoader.construct_plain_number)


def _fill(cfg: Config, tree: dict, source: str, problems: list[str]) -> None:
    sections = fields_of(Config)
    if not isinstance(tree, dict):
        problems.append(f"{source}: expected a mapping of sections (model, data, method, train)")
        return
    for name, body in tree.items():
        if name not in sections:
            problems.append(f"{source}: " + unknown_key(name, list(sections), ""))
            continue
        section = getattr(cfg, name)
        if body is None:
            continue
        if not isinstance(body, dict):
            problems.append(f"{source}: {name}: expected a mapping, got {show(body)}")
            continue
        hints = types_of(type(section))
        for key, value in body.items():
            if key not in hints:
                problems.append(f"{source}: " + unknown_key(key, list(hints), name))
                continue
            before = len(problems)
            value = check_value(value, hints[key], f"{source}: {name}.{key}", problems)
            if len(problems) == before:  # a mistyped value keeps the default, so validate() can still run
                setattr(section, key, value)


def _override(cfg: Config, item: str, problems: list[str]) -> None:
    if "=" not in item:
        problems.append(f"override {item!r}: expected section.key=value")
        return
    dotted, text = item.split("=", 1)
    parts = dotted.strip().split(".")
    sections = fields_of(Config)
    if len(parts) != 2 or parts[0] not in sections:
        known = [f"{s}.{k}" for s in sections for k in types_of(type(getattr(cfg, s)))]
        meant = suggest(parts[-1], "", []) or suggest(dotted, "", known)
        shown = dotted if dotted.isprintable() else show(dotted)
        problems.append(f"override {shown}: unknown key" + (f" (did you mean {meant}?)" if meant else ""))
        return
    section = getattr(cfg, parts[0])
    hints = types_of(type(section))
    if parts[1] not in hints:
        problems.append("override " + unknown_key(parts[1], list(hints), parts[0]))
        return
    try:
        setattr(section, parts[1], convert(text, hints[parts[1]], f"override {dotted}"))
    except ConfigError as err:
        problems.append(str(err))


def load(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config from a YAML file and dotted overrides; raise ConfigError listing every problem."""
    cfg = Config()
    problems: list[str] = []
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        tree = _read_yaml(p)
        _fill(cfg, tree, str(p), problems)
    for item in overrides or []:
        _override(cfg, item, problems)
    problems += validate(cfg)  # every problem at once: bad values never reach cfg, so this is safe
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg


def _read_yaml(p: Path):
    try:
        return yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except _Duplicate as err:
        raise ConfigError(f"{p} {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except (yaml.YAMLError, ValueError, OverflowError, RecursionError) as err:  # also bad dates, 5000-digit ints
        raise ConfigError(f"{p}: invalid YAML: {' '.join(str(err).split()) or type(err).__name__}") from None


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump(cfg: Config) -> str:
    """The resolved config as YAML (the same form load() reads back)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def from_dict(tree: dict, source: str = "config") -> Config:
    cfg = Config()
    problems: list[str] = []
    _fill(cfg, tree, source, problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError("\n".join(problems))
    return cfg

