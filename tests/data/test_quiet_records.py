"""Records that used to read without any notice: whitespace-only (NBSP too) fields, empty system messages,
Unicode noncharacters, a top-level system beside messages, files mixing formats, datasets rows with null
columns. Each is read as documented and counted (one warning line per kind naming the first record), or
refused naming the record and field; the warnings show in `slimtune inspect` and at train start."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimtune.config import DataConfig
from slimtune.data import build, with_system
from slimtune.data.readers import DataError, read

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
GOOD = {"instruction": "Q", "output": "A"}
ANSWER = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def _file(tmp_path: Path, records: list, name: str = "train.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _read(path: Path) -> tuple[list[list[dict]], list[str]]:
    lines: list[str] = []
    return [ex.messages for ex in read(path, log=lines.append)], lines


def test_whitespace_or_nbsp_only_instruction_input_or_system_reads_as_empty(tmp_path):
    path = _file(tmp_path, [
        GOOD,
        dict(GOOD, input="   "),
        dict(GOOD, input="\u00a0", system="\u00a0 \t"),  # two such fields: still one record
        {"instruction": "\u2003", "input": "Q", "output": "A"},
        dict(GOOD, system="S"),
    ])
    messages, lines = _read(path)
    assert messages == [ANSWER] * 4 + [[{"role": "system", "content": "S"}] + ANSWER]
    assert lines == [f'warning: {path}: 3 records with a whitespace-only instruction, input or system, read as '
                     'empty; first: line 2, field "input"']


def test_empty_or_whitespace_system_message_is_left_out_so_data_system_applies(tmp_path):
    path = _file(tmp_path, [
        {"messages": [{"role": "system", "content": ""}] + CHAT},
        {"messages": [{"role": "system", "content": "\u00a0"}] + CHAT},
        {"conversations": [{"from": "system", "value": " "}, {"from": "human", "value": "Hi"},
                           {"from": "gpt", "value": "Hello"}]},
        {"messages": [{"role": "system", "content": "S"}] + CHAT},
    ])
    lines: list[str] = []
    examples = read(path, log=lines.append)
    assert [ex.messages for ex in examples[:3]] == [CHAT] * 3
    assert with_system(examples[0], "Default")[0] == {"role": "system", "content": "Default"}
    assert examples[3].messages[0] == {"role": "system", "content": "S"}
    assert lines == [
        f'warning: {path}: 3 records with an empty system message, left out (data.system applies as without one); '
        'first: line 1, field "messages[0].content"',
        f"warning: {path}: 1 record in sharegpt format, the other 3 in messages; first: line 3",
    ]


def test_noncharacters_are_counted_naming_the_first_field(tmp_path):
    path = _file(tmp_path, [
        GOOD,
        {"instruction": "Q", "output": "A\ufffe"},  # a byte-swapped byte-order mark
        {"instruction": "Q\uffff", "input": "\ufdd0", "output": "A"},
        {"messages": [{"role": "user", "content": "Hi \U0010ffff"}, CHAT[1]]},
        {"instruction": "Q \ufffd \ufeff", "output": "A"},  # the replacement char and BOM are characters
    ])
    messages, lines = _read(path)
    assert messages[1] == [ANSWER[0], {"role": "assistant", "content": "A\ufffe"}]  # read, not refused
    assert lines[0] == (f"warning: {path}: 3 records with Unicode noncharacters (like U+FFFE, a byte-order mark "
                        'read in the wrong byte order) in text; first: line 2, field "output"')
    assert len(lines) == 2 and "in messages format" in lines[1]


def test_top_level_system_beside_messages_whitespace_or_beside_an_empty_system_turn(tmp_path):
    # the rule was there (a top-level system is the system message; beside a system turn, refused): a blank
    # one on either side now says nothing, so the other is used
    path = _file(tmp_path, [
        {"messages": CHAT, "system": " \u00a0"},
        {"messages": [{"role": "system", "content": ""}] + CHAT, "system": "Be brief."},
        {"messages": CHAT, "system": "Be brief."},
    ])
    messages, lines = _read(path)
    brief = [{"role": "system", "content": "Be brief."}] + CHAT
    assert messages == [CHAT, brief, brief]
    assert lines == [
        f'warning: {path}: 1 record with a whitespace-only instruction, input or system, read as empty; '
        'first: line 1, field "system"',
        f'warning: {path}: 1 record with an empty system message, left out (data.system applies as without one); '
        'first: line 2, field "messages[0].content"',
    ]
    path = _file(tmp_path, [{"messages": [{"role": "system", "content": "S"}] + CHAT, "system": "Be brief."}])
    with pytest.raises(DataError, match='line 1: field "system" is given beside a system message in "messages"'):
        read(path)


def test_alpaca_and_messages_mixed_in_one_file_warn_naming_the_rarer_kind(tmp_path):
    path = _file(tmp_path, [GOOD, GOOD, {"messages": CHAT}, GOOD, {"messages": CHAT}, GOOD])
    messages, lines = _read(path)
    assert messages == [ANSWER, ANSWER, CHAT, ANSWER, CHAT, ANSWER]  # each record is clear: all read
    assert lines == [f"warning: {path}: 2 records in messages format, the other 4 in alpaca; first: line 3"]
    path = _file(tmp_path, [GOOD, {"messages": CHAT}])  # a tie names the kind met last
    assert _read(path)[1] == [f"warning: {path}: 1 record in messages format, the other 1 in alpaca; first: line 2"]


def _folder(tmp_path: Path, rows: list[dict]) -> Path:
    import datasets

    folder = tmp_path / "ds"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


def test_datasets_folder_rows_mixing_formats_read_and_warn_with_the_row(tmp_path):
    # a datasets folder holds every column in every row: a row's other format's columns are null
    folder = _folder(tmp_path, [{"messages": CHAT, "instruction": None, "output": None},
                                {"messages": None, "instruction": "Q", "output": "A"},
                                {"messages": CHAT, "instruction": None, "output": None}])
    messages, lines = _read(folder)
    assert messages == [CHAT, ANSWER, CHAT]
    assert lines == [f"warning: {folder}: 1 record in alpaca format, the other 2 in messages; first: record 1"]


@pytest.mark.parametrize("rows, message", [
    ([GOOD | {"input": "x"}, {"instruction": None, "output": "A", "input": None}],
     'record 1: field "instruction" is missing; every alpaca record needs it'),
    ([{"messages": CHAT}, {"messages": [CHAT[0], {"role": "assistant", "content": None}]}],
     'record 1: field "messages[1].content" is missing; every message needs its text'),
    ([{"messages": CHAT, "instruction": None, "output": None}, {"messages": None, "instruction": None, "output": None}],
     """record 1: fields "messages", "instruction", "output" are all null (a datasets row with no value in any """
     """format's columns); fill in one format's fields or remove the row"""),
], ids=["required field null", "message text null", "every field null"])
def test_datasets_null_column_is_a_missing_field_named_with_its_row(tmp_path, rows, message):
    folder = _folder(tmp_path, rows)
    with pytest.raises(DataError) as err:
        read(folder)
    assert str(err.value) == f"{folder} {message}"


def test_datasets_sharegpt_rows_mixing_from_value_and_role_content(tmp_path):
    # the folder gives every turn all four keys, null where a row did not have them
    folder = _folder(tmp_path, [
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"conversations": CHAT},
    ])
    assert _read(folder) == ([CHAT, CHAT], [])


def test_warnings_show_in_inspect_and_at_train_start(tmp_path, tiny_model_dir, tokenizer, capsys):
    from slimtune import cli

    path = _file(tmp_path, [GOOD, dict(GOOD, input=" "), {"instruction": "Q\ufffe", "output": "A"},
                            {"messages": [{"role": "system", "content": ""}] + CHAT}])
    expected = [
        f"warning: {path}: 1 record with Unicode noncharacters (like U+FFFE, a byte-order mark read in the wrong "
        'byte order) in text; first: line 3, field "instruction"',
        f'warning: {path}: 1 record with a whitespace-only instruction, input or system, read as empty; first: '
        'line 2, field "input"',
        f"warning: {path}: 1 record with an empty system message, left out (data.system applies as without one); "
        'first: line 4, field "messages[0].content"',
        f"warning: {path}: 1 record in messages format, the other 3 in alpaca; first: line 4",
    ]
    assert cli.main(["inspect", str(path), "--model", str(tiny_model_dir), "--template", "chatml"]) == 0
    assert capsys.readouterr().err.splitlines() == expected
    lines: list[str] = []
    build(DataConfig(train=str(path), eval_size=0, template="chatml"), tokenizer, log=lines.append)
    assert lines[:4] == expected
