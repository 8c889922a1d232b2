"""Bad data through files: every malformed file or record gives a clean build or a DataError naming file,
record and field; never a traceback from inside a library, never a silently smaller dataset. With
data.on_bad_record=skip, each bad record is listed with its reason instead."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import write_jsonl
from slimtune import cli, models
from slimtune.config import DataConfig
from slimtune.data import build, read
from slimtune.data.readers import DataError

MAX_LEN = 200  # above any generated prompt (30 characters, at most 4 byte tokens each)
TEXT = st.text(min_size=1, max_size=30).filter(lambda s: s.strip())
NOT_STR = st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))


def _dump(rec) -> bytes:
    return json.dumps(rec).encode()  # ASCII escapes: a lone surrogate survives as \ud800


# Each line: (bytes, status, what an error or skip reason must name). ok: a record the build keeps;
# dropped: valid, but max_len leaves it no answer token (listed, not an error); bad: an error or a skip.
OK = st.one_of(
    st.builds(lambda i, o: (_dump({"instruction": i, "input": "", "output": o}), "ok", ""), TEXT, TEXT),
    st.builds(lambda u, a: (_dump({"messages": [{"role": "user", "content": u},
                                                {"role": "assistant", "content": a}]}), "ok", ""), TEXT, TEXT),
    st.builds(lambda n: (_dump({"instruction": "Hi", "output": "long answer " * n}), "ok", ""),  # huge answer:
              st.integers(100, 3000)),                                                           # truncated, kept
)
DROPPED = st.builds(lambda n: (_dump({"instruction": "long question " * n, "output": "x"}), "dropped", "max_len"),
                    st.integers(200, 3000))
BAD = st.one_of(
    st.builds(lambda v: (_dump({"instruction": v, "output": "x"}), "bad", '"instruction"'), NOT_STR),
    st.builds(lambda v: (_dump({"instruction": "q", "output": v}), "bad", '"output"'), NOT_STR),
    st.builds(lambda v: (_dump({"instruction": "q", "input": v, "output": "x"}), "bad", '"input"'), NOT_STR),
    st.just((_dump({"instruction": "q"}), "bad", 'field "output" is missing')),
    st.just((_dump({"output": "x"}), "bad", 'field "instruction" is missing')),
    st.sampled_from(["", " ", "\n\t"]).map(lambda e: (_dump({"instruction": "q", "output": e}), "bad",
                                                      'field "output" is empty')),
    st.just((_dump({"instruction": "", "input": "", "output": "x"}), "bad", '"instruction" and "input"')),
    st.just((_dump({"instruction": "q\ud800", "output": "x"}), "bad", 'field "instruction" holds an unpaired')),
    st.just((_dump({"messages": [{"role": "user", "content": "\udfff"}, {"role": "assistant", "content": "x"}]}),
             "bad", 'field "messages[0].content"')),
    st.builds(lambda v: (_dump({"messages": [{"role": "user", "content": v},
                                             {"role": "assistant", "content": "x"}]}), "bad",
                         'field "messages[0].content"'), NOT_STR),
    st.just((b'{"instruction": "caf\xe9", "output": "x"}', "bad", "not valid UTF-8")),
    st.builds(lambda n: (_dump({"instruction": "question", "output": "answer"})[:n], "bad", "invalid JSON"),
              st.integers(1, 35)),  # a truncated line
    st.sampled_from([b"[1, 2]", b'"just text"', b"5", b"null"]).map(lambda b: (b, "bad", "expected a JSON object")),
    st.just((b"[" * 50_000, "bad", "nested too deeply")),
    st.just((_dump({"question": "q", "answer": "a"}), "bad", 'neither field "messages"')),
)
LINE = st.one_of(OK, OK, DROPPED, BAD, BAD)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bad-records")


def _build(path: Path, tokenizer, skip: bool):
    cfg = DataConfig(train=str(path), eval_size=0, max_len=MAX_LEN, template="chatml",
                     on_bad_record="skip" if skip else "error")
    return build(cfg, tokenizer, log=lambda *_: None)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(LINE, min_size=1, max_size=6), skip=st.booleans(), blank=st.booleans())
def test_jsonl_builds_or_names_file_line_and_field(folder, tokenizer, lines, skip, blank):
    path = folder / "train.jsonl"
    if blank:  # a blank line: not a record, still counted in line numbers
        lines = lines[:len(lines) // 2] + [(b"   ", "blank", "")] + lines[len(lines) // 2:]
    path.write_bytes(b"\n".join(b for b, _, _ in lines) + b"\n")
    numbered = [(n, status, expect) for n, (_, status, expect) in enumerate(lines, start=1) if status != "blank"]
    ok = sum(status == "ok" for _, status, _ in numbered)
    bad = [(n, e) for n, status, e in numbered if status == "bad"]
    left_out = [(n, e) for n, status, e in numbered if status != "ok" and (skip or status == "dropped")]
    try:
        built = _build(path, tokenizer, skip)
    except DataError as err:
        msg = str(err)
        assert msg.startswith(str(path)), msg
        if bad and not skip:  # the first bad record stops the read, named by line and field
            n, expect = bad[0]
            assert msg.startswith(f"{path} line {n}: ") and expect in msg, (msg, bad[0])
        else:  # nothing was left to train on: an error, never an empty run
            assert ok == 0, msg
            assert "is bad" in msg or "no training record has an answer token left" in msg, msg
        return
    assert not (bad and not skip)
    assert len(built.train) == ok  # never a silently smaller dataset
    # bad records are listed as read, records dropped for max_len after encoding: compare in line order
    skipped = sorted(built.skipped, key=lambda s: int(s["where"].rsplit(" ", 1)[1]))
    assert [s["where"] for s in skipped] == [f"{path} line {n}" for n, _ in left_out]
    for s, (n, expect) in zip(skipped, left_out):
        assert s["reason"].startswith(f"{path} line {n}: ") and expect in s["reason"], (s, expect)


def _count(data: bytes, as_list: bool) -> int | None:
    """How many records the file holds, read independently of slimtune (None: unreadable as a whole)."""
    data = data.removeprefix(b"\xef\xbb\xbf")
    if as_list:
        try:
            return len(json.loads(data.decode("utf-8")))
        except (ValueError, RecursionError):
            return None
    count = 0
    for raw in data.split(b"\n"):
        try:
            count += bool(raw.decode("utf-8").strip())
        except UnicodeDecodeError:
            count += 1
    return count


GOOD = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(5)]


@settings(max_examples=100, deadline=None)
@given(as_list=st.booleans(), skip=st.booleans(), cut=st.floats(0, 1), junk=st.binary(max_size=8),
       at=st.floats(0, 1))
def test_truncated_or_corrupted_files_build_or_name_file_and_place(folder, tokenizer, as_list, skip, cut, junk, at):
    text = json.dumps(GOOD, indent=1) if as_list else "\n".join(json.dumps(r) for r in GOOD) + "\n"
    data = text.encode()
    where = int(at * len(data))
    data = (data[:where] + junk + data[where:])[: max(1, int(cut * (len(data) + len(junk))) + 1)]
    path = folder / ("train.json" if as_list else "train.jsonl")
    path.write_bytes(data)
    try:
        built = _build(path, tokenizer, skip)
    except DataError as err:
        msg = str(err)
        assert msg.startswith(f"{path} line ") or msg.startswith(f"{path} record ") or msg.startswith(f"{path}: "), msg
        return
    expected = _count(data, as_list and data.lstrip()[:1] == b"[")
    assert expected is not None
    assert len(built.train) + len(built.eval) + len(built.skipped) == expected


def test_skip_mode_run_writes_every_skipped_record_with_its_reason(tmp_path, tiny_model_dir, capsys):
    good = [{"instruction": f"Say {w}.", "output": f"{w}!"} for w in ("a", "b", "c", "d", "e", "f")]
    rows = [good[0], good[1], {"instruction": "q", "output": 7}, good[2], '{"instruction": "cut', good[3],
            {"instruction": "long " * 200, "output": "x"}, good[4], good[5]]
    data = tmp_path / "train.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    cfg = _train_config(tmp_path, tiny_model_dir, data, on_bad_record="skip")
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    out = capsys.readouterr().out
    skipped_file = tmp_path / "run" / "skipped_records.jsonl"
    assert f"3 records were left out of the run; each, with its reason, is in {skipped_file}" in out
    skipped = [json.loads(x) for x in skipped_file.read_text().splitlines()]
    assert [s["where"] for s in skipped] == [f"{data} line {n}" for n in (3, 5, 7)]
    assert 'field "output" must be a string, got int' in skipped[0]["reason"]
    assert skipped[0]["record"] == {"instruction": "q", "output": 7}
    assert "invalid JSON" in skipped[1]["reason"]
    assert "no trained token left after truncation to data.max_len=32" in skipped[2]["reason"]
    # cut away by truncation: the file, line and record itself, not "record": null
    assert (skipped[2]["file"], skipped[2]["line"], skipped[2]["record"]) == (str(data), 7, rows[6])
    # the same data with on_bad_record=error (the default) stops at line 3 before any model loads
    assert cli.main(["train", str(_train_config(tmp_path, tiny_model_dir, data, name="run2")), "--no-progress"]) == 2
    assert f'{data} line 3: field "output" must be a string, got int' in capsys.readouterr().err


def _train_config(tmp: Path, model_dir: Path, data: Path, name: str = "run", **data_cfg) -> Path:
    tree = {"model": {"path": str(model_dir)}, "data": {"train": str(data), "eval_size": 0, "max_len": 32, **data_cfg},
            "method": {"name": "lora", "r": 2, "target_modules": ["q_proj"]},
            "train": {"output_dir": str(tmp / name), "max_steps": 2, "micro_batch_size": 2, "device": "cpu"}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if the model's weights are loaded: these errors must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the error")
    monkeypatch.setattr(models, "load", refuse)


@pytest.mark.parametrize("rows, data_cfg, message", [
    ([], {}, "no records found"),
    (["", "  "], {}, "no records found"),
    ([{"instruction": "q " * 40, "output": "a"}] * 3, {"max_len": 8},
     "no training record has an answer token left within data.max_len=8; raise data.max_len"),
    ([{"instruction": "q", "output": 1}, "{broken"], {"on_bad_record": "skip"}, "every one of its 2 records is bad"),
], ids=["empty file", "blank lines only", "max_len shorter than every prompt", "every record bad (skip)"])
def test_no_usable_data_is_a_clear_error(tmp_path, tiny_model_dir, capsys, nothing_loads, rows, data_cfg, message):
    data = tmp_path / "train.jsonl"
    data.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    assert cli.main(["train", str(_train_config(tmp_path, tiny_model_dir, data, **data_cfg)), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"slimtune train: error: {data}" in err and message in err


def test_config_and_path_errors_come_before_anything_loads(tmp_path, tiny_model_dir, capsys, nothing_loads,
                                                           monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": "q", "output": "a"}] * 4)
    cfg = _train_config(tmp_path, tiny_model_dir, data)
    cases = [
        ([f"model.path={tmp_path / 'no-model'}"], f"model.path: {tmp_path / 'no-model'} does not exist"),
        ([f"data.train={tmp_path / 'missing.jsonl'}"], f"data.train: {tmp_path / 'missing.jsonl'} does not exist"),
        ([f"data.train={tmp_path}"], f"{tmp_path}: not a folder written by datasets' save_to_disk"),
    ]
    for overrides, message in cases:
        assert cli.main(["train", str(cfg), *overrides, "--no-progress"]) == 2
        assert message in capsys.readouterr().err
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer loaded first"))
    assert cli.main(["train", str(cfg), f"train.output_dir={other}", "--no-progress"]) == 2
    assert "already holds files that are not a slimtune run" in capsys.readouterr().err
    assert cli.main(["train", str(cfg), f"train.output_dir={other}", "--no-progress", "--overwrite"]) == 2
    assert (other / "notes.txt").read_text() == "mine"


def test_inspect_names_the_field_holding_a_lone_surrogate(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"instruction": "fine", "output": "bad \ud800 text"}) + "\n")
    assert cli.main(["inspect", str(path), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert f'{path} line 1: field "output" holds an unpaired surrogate' in err
    with pytest.raises(DataError, match='field "output"'):
        read(path)
