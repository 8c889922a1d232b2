"""Fuzz the data readers: random JSON/JSONL files, part well-formed records, part junk. Whatever the file holds,
only slimtune's own errors escape, and every record is either read or listed as skipped."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimtune.config import DataConfig
from slimtune.data import build
from slimtune.data.readers import DataError, read, read_prompts

KEYS = ["instruction", "input", "output", "system", "history", "messages", "conversations", "role", "content",
        "from", "value", "inptu", "id"]
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.sampled_from(["", " ", "user", "assistant", "gpt", "human", "system",
                                                          "<|im_end|>", "\ud800", "a\x00b", "\u00a0", "A\ufffe"]))
VALUE = st.recursive(SCALAR, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                    st.dictionaries(st.sampled_from(KEYS), kids, max_size=4)),
                     max_leaves=12)
TURN = st.fixed_dictionaries({}, optional={"role": VALUE, "content": VALUE, "from": VALUE, "value": VALUE})
RECORD = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), VALUE, max_size=5),
    st.fixed_dictionaries({"instruction": st.text(max_size=10), "output": st.text(max_size=10)},
                          optional={"input": VALUE, "history": VALUE, "system": VALUE, "inptu": VALUE}),
    st.fixed_dictionaries({"messages": st.lists(TURN, max_size=4)}, optional={"system": VALUE}),
    st.fixed_dictionaries({"conversations": st.lists(TURN, max_size=4)}),
    VALUE,
)


def _dump(rec) -> bytes:
    return json.dumps(rec).encode()  # ASCII escapes: a lone surrogate survives as \ud800; NaN as NaN


JUNK = st.one_of(
    st.binary(max_size=20),
    st.just(b'{"instruction": "Q", "output": "A", "n": ' + b"9" * 5000 + b"}"),
    st.just(b'{"instruction": "Q", "output": "A", "output": "B"}'),
    st.just(b"[" * 5000),
    st.just(b'{"instruction": "Q", "output": "A", "x": Infinity}'),
    RECORD.map(_dump).flatmap(lambda b: st.integers(0, len(b)).map(lambda n: b[:n])),  # cut short
)
LINE = st.one_of(RECORD.map(_dump), RECORD.map(_dump), JUNK)


def _count(data: bytes) -> int | None:
    """Records in a JSON list, counted without slimtune (None: the file cannot be read as a whole)."""
    try:
        return len(json.loads(data.decode("utf-8"), parse_int=str))
    except (ValueError, RecursionError):
        return None


def _blank(raw: bytes) -> bool:
    try:
        return not raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, min_size=1, max_size=6), as_list=st.booleans())
def test_readers_raise_only_data_errors_and_lose_no_record(folder, tokenizer, lines, as_list):
    if as_list:
        path, data = folder / "fuzz.json", b"[" + b",\n".join(lines) + b"]"
        expected = _count(data)
    else:
        path, data = folder / "fuzz.jsonl", b"\n".join(lines) + b"\n"
        expected = sum(not _blank(raw) for raw in data.split(b"\n"))
    path.write_bytes(data)
    try:
        examples = read(path, log=lambda _: None)
        assert len(examples) == expected  # error mode: all read, or an error
    except DataError as err:
        assert str(err).startswith(str(path)), err
    skipped: list[dict] = []
    try:
        examples = read(path, skipped=skipped, log=lambda _: None)
        assert len(examples) + len(skipped) == expected
        assert all(s["reason"].startswith(f"{s['where']}: ") for s in skipped)
    except DataError as err:  # a file unreadable as a whole, or every record bad
        assert not expected or "is bad" in str(err), err
    try:
        read_prompts(path, log=lambda _: None)
    except DataError:
        pass
    cfg = DataConfig(train=str(path), eval_size=0, max_len=64, on_bad_record="skip")
    try:  # through the template and tokenizer too: what reads must encode or be listed
        built = build(cfg, tokenizer, log=lambda *_: None)
        assert len(built.train) + len(built.skipped) == expected
    except DataError as err:  # nothing left to train on; any other error would escape and fail the test
        assert not expected or "is bad" in str(err) or "no training record" in str(err), err
