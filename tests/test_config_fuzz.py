"""Fuzzing the config loader: whatever the YAML text or the dotted overrides, the only exception that escapes
is ConfigError (one message per problem), never a Python error from deep inside."""
from __future__ import annotations

import math
import typing

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimtune import config
from slimtune.config import Config, ConfigError

KNOWN = [f"{s}.{k}" for s in ("model", "data", "method", "train")
         for k in typing.get_type_hints(typing.get_type_hints(Config)[s])]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2 ** 60),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.sampled_from(["nan", ".inf", "-1", "0", "1e-4", "2**64", "[]", "q_proj", "auto", "9" * 5000]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=3), max_leaves=8)
KEYS = st.one_of(st.sampled_from(KNOWN), st.text(max_size=15))
SETTINGS = settings(max_examples=200, deadline=None, database=None,  # no .hypothesis folder left behind
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def _tree(pairs: list[tuple[str, object]]) -> dict:
    tree: dict = {}
    for dotted, value in pairs:
        section, _, key = dotted.partition(".")
        if key:
            body = tree.setdefault(section, {})
            if isinstance(body, dict):
                body[key] = value
        else:
            tree[section] = value
    return tree


def _load(path, overrides=()) -> None:
    try:
        cfg = config.load(path, list(overrides))
    except ConfigError as err:
        assert str(err) and all(line for line in str(err).splitlines())
        return
    assert math.isfinite(cfg.train.lr) and 0 < cfg.train.lr <= 10 and cfg.train.adam_eps > 0  # what validate() promises


@SETTINGS
@given(st.lists(st.tuples(KEYS, VALUES), max_size=6))
def test_yaml_trees(tmp_path, pairs):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(_tree(pairs), allow_unicode=True), encoding="utf-8")
    _load(path)


@SETTINGS
@given(st.text(alphabet=st.sampled_from(list("trainlr:. -[]{}&*!|>'\"#%@`,?=\n\t0123456789e") + ["\u00e9", "\x00"]),
               max_size=80))
def test_yaml_text(tmp_path, text):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    _load(path)


@SETTINGS
@given(st.lists(st.one_of(st.tuples(KEYS, st.text(max_size=30)).map("=".join),
                          st.tuples(KEYS, SCALARS.map(str)).map(lambda kv: f"{kv[0]}={kv[1]}"),
                          st.text(max_size=20)), max_size=5))
def test_dotted_overrides(overrides):
    _load(None, overrides)


@SETTINGS
@given(st.integers(min_value=0, max_value=10 ** 6), st.sampled_from(["_", "\u0661", "\uff11", "\u0967", "\u00b2"]),
       st.sampled_from(["train.max_steps", "train.lr", "data.max_len", "train.batch_size", "data.eval_size"]))
def test_numbers_take_ascii_digits_only(n, odd, key):
    """int() and float() read '1_0' as 10 and Arabic-Indic or full-width digits as ASCII ones (issue 27 item 14)."""
    text = str(n)[:1] + odd + str(n)[1:]
    with pytest.raises(ConfigError, match="write numbers with the ASCII digits 0-9 and no underscores"):
        config.load(None, [f"{key}={text}"])
