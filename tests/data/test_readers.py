"""Readers: alpaca and chat records from JSON, JSONL and save_to_disk folders; a bad record names file, line, field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slimtune import cli
from slimtune.data.readers import DataError, Example, parse, read, read_prompts

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate to English.", "input": "bonjour", "output": "hello"},
    {"instruction": "Who are you?", "output": "A small model.", "system": "Be brief."},
    {"instruction": "And 3+3?", "output": "6", "history": [["1+1?", "2"], ["2+2?", "4"]]},
]
ALPACA_MESSAGES = [
    [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}],
    [{"role": "user", "content": "Translate to English.\nbonjour"}, {"role": "assistant", "content": "hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
     {"role": "assistant", "content": "A small model."}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "6"}],
]
CHAT = [
    {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                  {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}]},
]
GOOD = json.dumps(ALPACA[0])


def jsonl(path: Path, lines: list) -> Path:
    """One line per item: a dict/list is dumped as JSON, a str is written as is (blank and broken lines)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x, ensure_ascii=False)) + "\n" for x in lines),
                    encoding="utf-8")
    return path


def messages(examples: list[Example]) -> list[list[dict]]:
    return [ex.messages for ex in examples]


# --- valid records ---

def test_alpaca_jsonl_messages_and_line_numbers(tmp_path):
    # blank and whitespace-only lines are skipped but still counted, so line numbers match an editor's
    path = jsonl(tmp_path / "train.jsonl", [ALPACA[0], ALPACA[1], "", ALPACA[2], "   ", ALPACA[3]])
    examples = read(path)
    assert messages(examples) == ALPACA_MESSAGES
    assert [ex.where for ex in examples] == [f"{path} line 1", f"{path} line 2", f"{path} line 4",
                                             f"{path} line 6"]


def test_alpaca_json_list_messages_and_record_indexes(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(ALPACA, indent=2), encoding="utf-8")
    examples = read(path)
    assert messages(examples) == ALPACA_MESSAGES
    assert [ex.where for ex in examples] == [f"{path} record {i}" for i in range(4)]


def test_json_file_with_one_object_per_line_reads_as_jsonl(tmp_path):
    path = jsonl(tmp_path / "train.json", ALPACA[:2])
    assert [ex.where for ex in read(path)] == [f"{path} line 1", f"{path} line 2"]


def test_crlf_line_endings(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\r\n".join(json.dumps(r).encode() for r in ALPACA[:2]) + b"\r\n")
    assert messages(read(path)) == ALPACA_MESSAGES[:2]


def test_messages_jsonl(tmp_path):
    path = jsonl(tmp_path / "chat.jsonl", CHAT)
    examples = read(path)
    assert messages(examples) == [r["messages"] for r in CHAT]
    assert [ex.where for ex in examples] == [f"{path} line 1", f"{path} line 2"]


def test_alpaca_and_messages_records_mix(tmp_path):
    path = jsonl(tmp_path / "mixed.jsonl", [CHAT[0], ALPACA[1]])
    assert messages(read(path)) == [CHAT[0]["messages"], ALPACA_MESSAGES[1]]


def test_unicode_content(tmp_path):
    rec = {"instruction": "你好，世界", "input": "é", "output": "Grüße 👋"}
    assert messages(read(jsonl(tmp_path / "u.jsonl", [rec]))) == [
        [{"role": "user", "content": "你好，世界\né"}, {"role": "assistant", "content": "Grüße 👋"}]]


def test_limit_reads_first_records(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", ALPACA)
    assert messages(read(path, limit=2)) == ALPACA_MESSAGES[:2]
    assert messages(read(path, limit=0)) == ALPACA_MESSAGES


def test_forced_format(tmp_path):
    path = jsonl(tmp_path / "chat.jsonl", CHAT)
    assert messages(read(path, fmt="messages")) == [r["messages"] for r in CHAT]
    with pytest.raises(DataError) as err:
        read(path, fmt="alpaca")
    assert str(err.value) == f'{path} line 1: field "instruction" is missing; every alpaca record needs it'


@pytest.mark.parametrize("rows, jsonl_rows", [(ALPACA, ALPACA), (CHAT, CHAT)], ids=["alpaca", "messages"])
def test_save_to_disk_folder_reads_like_jsonl(tmp_path, rows, jsonl_rows):
    import datasets

    # from_list takes its columns from the first row, so give every row the same keys
    keys = sorted({k for r in rows for k in r})
    uniform = [{k: r.get(k) for k in keys} for r in rows]
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(uniform).save_to_disk(str(folder))
    from_disk = read(folder)
    from_jsonl = read(jsonl(tmp_path / "same.jsonl", jsonl_rows))
    assert messages(from_disk) == messages(from_jsonl)
    assert [ex.where for ex in from_disk] == [f"{folder} record {i}" for i in range(len(rows))]


def test_save_to_disk_datasetdict(tmp_path):
    import datasets

    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ALPACA[:2]),
                          "test": datasets.Dataset.from_list(ALPACA[1:2])}).save_to_disk(str(folder))
    assert messages(read(folder)) == ALPACA_MESSAGES[:2]
    other = tmp_path / "dd2"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list(ALPACA[:1])}).save_to_disk(str(other))
    with pytest.raises(DataError) as err:
        read(other)
    assert str(err.value) == f"{other}: a DatasetDict without a 'train' split (splits: validation)"


def test_folder_that_is_not_a_dataset(tmp_path):
    with pytest.raises(DataError) as err:
        read(tmp_path)
    assert str(err.value).startswith(f"{tmp_path}: not a folder written by datasets' save_to_disk")


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as err:
        read(tmp_path / "nope.jsonl")
    assert str(err.value) == f"{tmp_path / 'nope.jsonl'}: data file not found"


# --- bad records: the first one stops the read with file, line (or record) and field ---

BAD_RECORDS = {
    "missing output": ({"instruction": "Say hi."},
                       'line 2: field "output" is missing; every alpaca record needs it'),
    "null output": ({"instruction": "Say hi.", "output": None},
                    'line 2: field "output" is missing; every alpaca record needs it'),
    "instruction not a string": ({"instruction": 5, "output": "five"},
                                 'line 2: field "instruction" must be a string, got int'),
    "input not a string": ({"instruction": "Sum.", "input": [1, 2], "output": "3"},
                           'line 2: field "input" must be a string, got list'),
    "system not a string": ({"instruction": "Hi", "output": "Hello", "system": {"text": "x"}},
                            'line 2: field "system" must be a string, got dict'),
    "empty output": ({"instruction": "Say hi.", "output": ""},
                     'line 2: field "output" is empty; every record needs a non-empty output'),
    "blank output": ({"instruction": "Say hi.", "output": " \n"},
                     'line 2: field "output" is empty; every record needs a non-empty output'),
    "empty prompt": ({"instruction": "", "input": "", "output": "x"},
                     'line 2: fields "instruction" and "input" are both empty; the prompt needs text'),
    "history not a list": ({"instruction": "Q", "output": "A", "history": "1+1? 2"},
                           'line 2: field "history" must be a list of [user, assistant] pairs'),
    "history empty object": ({"instruction": "Q", "output": "A", "history": {}},
                             'line 2: field "history" must be a list of [user, assistant] pairs'),
    "history item not a pair": ({"instruction": "Q", "output": "A", "history": [["1+1?", "2"], ["3+3?"]]},
                                'line 2: field "history[1]" must be a [user, assistant] pair of strings'),
    "history item not strings": ({"instruction": "Q", "output": "A", "history": [["1+1?", 2]]},
                                 'line 2: field "history[0]" must be a [user, assistant] pair of strings'),
    "history empty answer": ({"instruction": "Q", "output": "A", "history": [["1+1?", ""]]},
                             'line 2: field "history[0][1]" is empty; every assistant turn needs text'),
    "unknown role": ({"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "x"}]},
                     "line 2: field \"messages[0].role\" is 'robot'; expected one of system, user, assistant"),
    "content not a string": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": 7}]},
                             'line 2: field "messages[1].content" must be a string, got int'),
    "content missing": ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
                        'line 2: field "messages[0].content" is missing; every message needs its text'),
    "last message not assistant": (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                      {"role": "user", "content": "Bye"}]},
        "line 2: field \"messages[2].role\": the last message must be the assistant's answer"),
    "turns do not alternate": (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello"},
                      {"role": "assistant", "content": "x"}]},
        "line 2: field \"messages[1].role\" is 'user'; turns must alternate user/assistant starting with user "
        "(expected 'assistant')"),
    "system not first": (
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "system", "content": "s"},
                      {"role": "assistant", "content": "x"}]},
        'line 2: field "messages[1].role": a system message may only come first'),
    "empty assistant turn": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""}]},
                             'line 2: field "messages[1].content" is empty; every assistant turn needs text'),
    "message not an object": ({"messages": ["Hi", {"role": "assistant", "content": "x"}]},
                              'line 2: field "messages[0]" must be an object with "role" and "content"'),
    "messages empty": ({"messages": []},
                       'line 2: field "messages" must be a non-empty list of {"role", "content"} objects'),
    "messages not a list": ({"messages": "Hi"},
                            'line 2: field "messages" must be a non-empty list of {"role", "content"} objects'),
    "neither messages nor instruction": (
        {"question": "Hi", "answer": "Hello"},
        'line 2: neither field "messages" (chat), "conversations" (sharegpt) nor "instruction"/"output" (alpaca) '
        'found; '
        "fields present: question, answer"),
    "record is a list": (["Say hi.", "hi"], "line 2: expected a JSON object, got list"),
    "record is a string": ("\"just text\"", "line 2: expected a JSON object, got str"),
}


@pytest.mark.parametrize("bad, message", list(BAD_RECORDS.values()), ids=list(BAD_RECORDS))
def test_bad_record_names_file_line_and_field(tmp_path, bad, message):
    path = jsonl(tmp_path / "train.jsonl", [GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value) == f"{path} {message}"


@pytest.mark.parametrize("bad, message", [BAD_RECORDS["missing output"], BAD_RECORDS["unknown role"]],
                         ids=["missing output", "unknown role"])
def test_bad_record_in_json_list_names_record_index(tmp_path, bad, message):
    path = tmp_path / "train.json"
    path.write_text(json.dumps([ALPACA[0], ALPACA[1], bad], indent=1), encoding="utf-8")
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value) == f"{path} record 2: " + message.split(": ", 1)[1]


def test_bad_record_in_the_middle_raises_instead_of_dropping(tmp_path):
    rows = [ALPACA[0]] * 5 + [{"instruction": "x", "output": ""}] + [ALPACA[1]] * 5
    path = jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"line 6: field \"output\" is empty"):
        read(path)
    with pytest.raises(DataError, match=r"line 6: field \"output\" is empty"):
        read(path, limit=6)
    assert len(read(path, limit=5)) == 5  # records after the limit are not read at all


def test_invalid_json_line_names_the_line(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, '{"instruction": "x", "output": }', GOOD])
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value) == f"{path} line 3: invalid JSON at column 32: Expecting value"


def test_invalid_json_in_json_list_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c", "output": "d",}\n]\n',
                    encoding="utf-8")
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value) == (f"{path} line 3 column 38: invalid JSON: "
                              "Expecting property name enclosed in double quotes")


def test_non_utf8_jsonl_names_the_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(GOOD.encode() + b'\n{"instruction": "caf\xe9", "output": "x"}\n')
    with pytest.raises(DataError) as err:
        read(path)
    byte = len(b'{"instruction": "caf')  # counted from the start of the line
    assert str(err.value) == f"{path} line 2: not valid UTF-8 (byte {byte}): save the file as UTF-8"


def test_non_utf8_json_list_names_the_line(tmp_path):
    path = tmp_path / "train.json"
    head = b'[\n  ' + GOOD.encode() + b',\n  {"instruction": "caf'
    path.write_bytes(head + b'\xe9", "output": "x"}\n]\n')
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value) == f"{path} line 3: not valid UTF-8 (byte {len(head)}): save the file as UTF-8"


@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n"), ("empty.json", "[]"),
                                           ("empty.json", "  [ ]\n")])
def test_empty_source_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value) == f"{path}: no records found"


def test_cli_inspect_bad_file_exits_2(tmp_path, capsys, tiny_model_dir):
    path = jsonl(tmp_path / "train.jsonl", [GOOD, GOOD, GOOD, {"instruction": "Say hi.", "output": 5}])
    code = cli.main(["inspect", str(path), "--model", str(tiny_model_dir)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == f'slimtune inspect: error: {path} line 4: field "output" must be a string, got int\n'


# --- prompts for generation ---

def test_read_prompts_drops_the_answer(tmp_path):
    path = jsonl(tmp_path / "prompts.jsonl", [
        {"instruction": "Translate to English.", "input": "bonjour"},
        {"instruction": "Add 2 and 3.", "output": "5", "id": 7},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi"}]},
    ])
    prompts, raws = read_prompts(path)
    assert messages(prompts) == [
        [{"role": "user", "content": "Translate to English.\nbonjour"}],
        [{"role": "user", "content": "Add 2 and 3."}],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "Hi"}],
    ]
    assert raws[1] == {"instruction": "Add 2 and 3.", "output": "5", "id": 7}  # kept as written
    assert [p.where for p in prompts] == [f"{path} line {i}" for i in (1, 2, 3)]


@pytest.mark.parametrize("bad, message", [
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
     'line 1: field "messages": a prompt must end with a user message'),
    ({"messages": ["Hi"]}, 'line 1: field "messages[0]" must be an object with "role" and "content"'),
    ({"instruction": 3}, 'line 1: field "instruction" must be a string, got int'),
], ids=["ends with assistant", "message not an object", "instruction not a string"])
def test_read_prompts_errors(tmp_path, bad, message):
    path = jsonl(tmp_path / "prompts.jsonl", [bad])
    with pytest.raises(DataError) as err:
        read_prompts(path)
    assert str(err.value) == f"{path} {message}"


# --- property: parse never raises anything but a DataError that names where and a field ---

VALUES = st.one_of(st.text(max_size=8), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
                   st.booleans(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=1))
MISSING = object()
FIELD = st.one_of(st.just(MISSING), VALUES)
HISTORY = st.one_of(st.just(MISSING), VALUES, st.lists(st.lists(st.one_of(st.text(max_size=3), st.integers()),
                                                                max_size=3), max_size=2))


@settings(max_examples=300, deadline=None)
@given(instruction=FIELD, extra=FIELD, output=FIELD, system=FIELD, history=HISTORY,
       where=st.text(min_size=1, max_size=12).map(lambda s: f"data {s}.jsonl line 9"))
def test_parse_returns_example_or_data_error(instruction, extra, output, system, history, where):
    rec = {k: v for k, v in (("instruction", instruction), ("input", extra), ("output", output),
                             ("system", system), ("history", history)) if v is not MISSING}
    try:
        ex = parse(rec, where)
    except DataError as err:
        msg = str(err)
        assert msg.startswith(f"{where}: ")
        assert any(f'"{name}' in msg for name in ("instruction", "input", "output", "system", "history",
                                                   "messages")), msg
        return
    assert isinstance(output, str) and output.strip()
    assert ex.where == where
    assert ex.messages[-1] == {"role": "assistant", "content": output}
    assert ex.messages[-2]["role"] == "user"
    # a whitespace-only instruction or input reads as empty
    assert ex.messages[-2]["content"] == "\n".join(p for p in (instruction, extra) if isinstance(p, str) and p.strip())
    assert all(isinstance(m["content"], str) for m in ex.messages)


@settings(max_examples=200, deadline=None)
@given(msgs=st.lists(st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(
    ["system", "user", "assistant", "robot"]), VALUES), "content": VALUES}), max_size=4))
def test_parse_messages_returns_example_or_data_error(msgs):
    where = "chat.jsonl line 3"
    try:
        ex = parse({"messages": msgs}, where)
    except DataError as err:
        assert str(err).startswith(f"{where}: field \"messages")
        return
    blank_system = msgs[0]["role"] == "system" and not msgs[0]["content"].strip()  # left out
    assert ex.messages == msgs[blank_system:] and msgs[-1]["role"] == "assistant"


def test_utf8_byte_order_mark_is_read(tmp_path):
    rows = [{"instruction": "Q", "output": "A"}]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\n")
    listed = tmp_path / "bom.json"
    listed.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows).encode())
    for path in (jsonl, listed):
        (ex,) = read(path)
        assert ex.messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
