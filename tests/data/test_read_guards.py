"""One guarded read path for every command: JSON Python cannot hold is an error naming file, record and field;
readable but odd records are counted and reported, one line per kind naming the first record."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune import data
from slimtune.config import DataConfig
from slimtune.data import build, readers
from slimtune.data.readers import DataError, read, read_prompts
from slimtune.evaluate import report

GOOD = {"instruction": "Q", "output": "A"}
HUGE = '{"instruction": "Q", "output": "A", "id": ' + "7" * 5000 + "}"
DEEP = "[" * 100_000


def _file(tmp_path: Path, lines: list, name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


def test_every_command_reads_through_one_function(monkeypatch):
    assert report.read is readers.read  # eval
    calls = []
    monkeypatch.setattr(readers, "read", lambda path, *a, **k: calls.append(path) or [])
    data.read("train.jsonl")  # train, inspect, estimate
    readers.read_prompts("prompts.jsonl")  # generate
    assert calls == ["train.jsonl", "prompts.jsonl"]


@pytest.mark.parametrize("reader", [read, lambda p: read_prompts(p)[0], report.read, data.read],
                         ids=["read", "read_prompts", "eval", "train"])
@pytest.mark.parametrize("line, message", [
    (HUGE, 'line 2: field "id" holds an integer of 5000 digits, more than Python reads (4300); write it as a '
           "string or remove it"),
    (json.dumps({"instruction": "Q \ud800", "output": "A"}),
     'line 2: field "instruction" holds an unpaired surrogate'),
    (DEEP, "line 2: JSON nested too deeply to read"),
], ids=["5000-digit int", "lone surrogate", "deep nesting"])
def test_json_python_cannot_hold_names_file_line_and_field(tmp_path, reader, line, message):
    path = _file(tmp_path, [GOOD, line])
    with pytest.raises(DataError) as err:
        reader(path)
    assert str(err.value).startswith(f"{path} {message}")


def test_json_list_file_with_a_huge_int_or_deep_nesting(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"instruction": "Q", "output": "A"}, {"instruction": "Q", "output": "A", "n": -'
                    + "1" * 5000 + "}]")
    with pytest.raises(DataError, match=f'^{path} record 1: field "n" holds an integer of 5000 digits'):
        read(path)
    path.write_text(DEEP)
    with pytest.raises(DataError, match=f"^{path}: JSON nested too deeply to read"):
        read(path)


def test_skip_mode_lists_the_huge_int_record_and_keeps_the_rest(tmp_path):
    path = _file(tmp_path, [GOOD, HUGE, GOOD])
    skipped: list[dict] = []
    assert len(read(path, skipped=skipped)) == 2
    assert [(s["file"], s["line"]) for s in skipped] == [(str(path), 2)]
    assert "5000 digits" in skipped[0]["reason"]


def _warnings(path: Path, **kw) -> list[str]:
    lines: list[str] = []
    read(path, log=lines.append, **kw)
    return lines


def test_odd_records_are_counted_with_the_first_named(tmp_path):
    path = _file(tmp_path, [
        GOOD,
        '{"instruction": "Q", "output": "A", "output": "B"}',
        {"instruction": "Q", "inptu": "x", "output": "A"},
        '{"instruction": "Q", "output": "A", "score": NaN}',
        '{"instruction": "Q", "output": "A", "score": -Infinity}',
        {"instruction": "Q\u0000", "output": "A"},
        {"instruction": "Q", "output": "A\u001b[31m"},
        {"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "A"}]},
        {"instruction": "Q", "output": "A", "inptu": "y", "id": 3},
    ])
    lines = _warnings(path)
    assert lines == [
        f'warning: {path}: 1 record with a repeated JSON key (the last value is used); first: line 2, field "output"',
        f'warning: {path}: 4 records with keys slimtune does not read; first: line 3, field "inptu"; keys: '
        '"inptu" (did you mean "input"?), "score", "id"',
        f'warning: {path}: 2 records with NaN or Infinity, which standard JSON does not allow; first: line 4, '
        'field "score"',
        f'warning: {path}: 2 records with NUL or other control characters in text; first: line 6, '
        'field "instruction"',
        f"warning: {path}: 1 record with an empty user turn; first: line 8",
        f"warning: {path}: 1 record in messages format, the other 8 in alpaca; first: line 8",
    ]
    examples = read(path, log=lambda _: None)
    assert examples[1].messages[-1]["content"] == "B"  # json's rule, now said out loud


def test_clean_file_gives_no_warning(tmp_path):
    assert _warnings(_file(tmp_path, [GOOD, dict(GOOD, input="", system="")])) == []
    assert _warnings(_file(tmp_path, [{"messages": [{"role": "user", "content": "Hi"},
                                                    {"role": "assistant", "content": "Hello"}]}])) == []


def test_messages_with_alpaca_fields_is_refused(tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = _file(tmp_path, [{"messages": chat, "instruction": "Q", "output": "A"}])
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value) == (f'{path} line 1: fields "messages", "instruction", "output" belong to different '
                              "formats (messages and alpaca); keep one format per record")


def test_top_level_system_beside_messages(tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = _file(tmp_path, [{"messages": chat, "system": "Be brief."}])
    (ex,) = read(path)
    assert ex.messages[0] == {"role": "system", "content": "Be brief."}  # read, not silently dropped
    path = _file(tmp_path, [{"messages": [{"role": "system", "content": "S"}] + chat, "system": "Be brief."}])
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value) == (f'{path} line 1: field "system" is given beside a system message in "messages"; '
                              "keep one of them")


def test_negative_limit_is_refused(tmp_path):
    path = _file(tmp_path, [GOOD, GOOD])
    with pytest.raises(DataError, match=r"data.limit=-1 is negative; use 0 for every record or a positive count"):
        read(path, limit=-1)
    with pytest.raises(DataError, match="data.limit=-1"):
        build(DataConfig(train=str(path), limit=-1), tokenizer=None)


def test_build_reports_warnings_through_its_log(tmp_path, tokenizer):
    path = _file(tmp_path, [GOOD, {"instruction": "Q", "inptu": "x", "output": "A"}])
    lines: list[str] = []
    build(DataConfig(train=str(path), eval_size=0, template="chatml"), tokenizer, log=lines.append)
    assert any(line.startswith(f"warning: {path}: 1 record with keys slimtune does not read") for line in lines)


def test_inspect_names_the_huge_int_in_one_line(tmp_path, tiny_model_dir, capsys):
    from slimtune import cli

    path = _file(tmp_path, [GOOD, HUGE])
    assert cli.main(["inspect", str(path), "--model", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err == (f'slimtune inspect: error: {path} line 2: field "id" holds an integer of 5000 '
                                       "digits, more than Python reads (4300); write it as a string or remove it\n")
