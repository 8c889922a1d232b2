"""Values against the fields' declared types: command-line text converted, YAML values checked."""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

import yaml

from ..errors import SlimtuneError


class ConfigError(SlimtuneError, ValueError):
    """A config problem; the message lists every problem found, one per line."""


AUTO = "auto"
INT_OR_AUTO = int | str  # a whole number, or "auto" (the only string such a field takes)


def fields_of(cls) -> dict[str, dataclasses.Field]:
    """{name: Field} of a config dataclass, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls)}


def types_of(cls) -> dict[str, Any]:
    """{name: declared type} of a config dataclass (annotations resolved)."""
    return typing.get_type_hints(cls)


NUMBER_TYPES = (int, float, INT_OR_AUTO)


def odd_number(text: str, where: str) -> str | None:
    """The problem with a number's text that Python reads but a person may not mean: digits of another script
    (int('١٢') is 12) or underscores (int('1_0') is 10, and YAML 1.1 reads 1_0 as 10 too); else None."""
    if text.isascii() and "_" not in text:
        return None
    return f"{where}: {show(text)}: write numbers with the ASCII digits 0-9 and no underscores (e.g. 12, 1000, 2e-4)"


def convert(text: str, tp: Any, where: str) -> Any:
    """Convert a command-line string to the field's declared type (never guessed from the text)."""
    origin = typing.get_origin(tp)
    odd = odd_number(text.strip(), where) if tp in NUMBER_TYPES else None
    if odd:
        raise ConfigError(odd)
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {show(text)}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {show(text)}") from None
    if tp == INT_OR_AUTO:
        if text.strip().lower() == AUTO:
            return AUTO
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a whole number or auto, got {show(text)}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{where}: expected a number, got {show(text)}") from None
    if tp is str:
        return text
    if origin is list:
        (item,) = typing.get_args(tp)
        try:
            parsed = yaml.safe_load(text) if text.strip().startswith("[") else text.split(",")
            items = [str(x).strip() for x in parsed] if isinstance(parsed, list) else None
        except (yaml.YAMLError, ValueError, RecursionError):  # ValueError: str() of a 5000-digit int
            items = None
        if items is None:
            raise ConfigError(f"{where}: expected a list like a,b or [a, b], got {show(text)}")
        return [convert(x, item, where) for x in items if x]
    raise ConfigError(f"{where}: cannot convert to {tp}")  # pragma: no cover - all field types handled above


def check_value(value: Any, tp: Any, where: str, problems: list[str]) -> Any:
    """Check a YAML value against the declared type; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    odd = odd_number(value, where) if tp in NUMBER_TYPES and isinstance(value, str) else None
    if odd:
        problems.append(odd)
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value) if value.bit_length() <= 1000 else math.inf  # float() overflows past ~1e308
    if tp is float and isinstance(value, str):  # YAML reads 2e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp == INT_OR_AUTO:
        if value != AUTO and (not isinstance(value, int) or isinstance(value, bool)):
            problems.append(f"{where}: expected a whole number or auto, got {show(value)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {show(value)}")
            return value
        (item,) = typing.get_args(tp)
        return [check_value(v, item, f"{where}[{i}]", problems) for i, v in enumerate(value)]
    expected = tp if isinstance(tp, type) else object
    if expected is not object and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        problems.append(f"{where}: expected {expected.__name__}, got {show(value)}")
    return value


def show(value: object) -> str:
    """repr for a message, kept short: Python refuses str() of an int past 4300 digits."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

