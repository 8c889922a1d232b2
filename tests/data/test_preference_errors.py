"""Every malformed preference record stops with ONE line naming the file, the record and the field, from the reader
and from `slimtune inspect` (no traceback); data.on_bad_record=skip lists it instead."""
from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from slimtune import cli
from slimtune.data import DataError
from slimtune.data.pref_read import read

TURN = {"from": "human", "value": "Hi"}
USER, BOT = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}
CASES = {
    "missing chosen": ({"prompt": "Hi", "rejected": "no"},
                       'line 1: field "chosen" is missing; every pair needs "chosen" and "rejected"'),
    "missing rejected (sharegpt)": ({"conversations": [TURN], "chosen": {"from": "gpt", "value": "yes"}},
                                    'line 1: field "rejected" is missing'),
    "chosen not a string or turn": ({"prompt": "Hi", "chosen": 5, "rejected": "no"},
                                    'line 1: field "chosen" must be a string or an assistant message, got int'),
    "chosen turn text not a string": ({"conversations": [TURN], "chosen": {"from": "gpt", "value": ["x"]},
                                       "rejected": {"from": "gpt", "value": "no"}},
                                      'line 1: field "chosen.value" must be a string, got list'),
    "chosen in the wrong role": ({"conversations": [TURN], "chosen": {"from": "human", "value": "yes"},
                                  "rejected": {"from": "gpt", "value": "no"}},
                                 "line 1: field \"chosen.from\" is 'human'; an answer must be the assistant's"),
    "rejected of two messages": ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "yes",
                                  "rejected": [BOT, USER]},
                                 'line 1: field "rejected" must hold one assistant message, got 2 messages'),
    "prompt ending with the assistant": ({"prompt": [{"role": "user", "content": "Hi"},
                                                     {"role": "assistant", "content": "Yo"}],
                                          "chosen": "yes", "rejected": "no"},
                                         'line 1: field "prompt[1].role": the prompt must end with the user\'s'),
    "prompt turn in a wrong role": ({"prompt": [{"role": "robot", "content": "Hi"}], "chosen": "yes", "rejected": "no"},
                                    "line 1: field \"prompt[0].role\" is 'robot'; expected one of system, user, "),
    "prompt turn role a list": ({"prompt": [{"role": ["user"], "content": "Hi"}], "chosen": "yes", "rejected": "no"},
                                'line 1: field "prompt[0].role" is [\'user\']; expected one of system, user, '),
    "implicit prompt as strings": ({"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"},
                                   'line 1: field "prompt" is missing; a pair without one needs "chosen" and '),
    "implicit prompt sharing nothing": ({"chosen": [USER, BOT], "rejected": [{"role": "user", "content": "c"}, BOT]},
                                        'line 1: fields "chosen" and "rejected" share no first message'),
    "alpaca pair without instruction": ({"input": "x", "chosen": "yes", "rejected": "no"},
                                        'line 1: field "instruction" is missing'),
    "two prompt fields": ({"prompt": "Hi", "instruction": "Hi", "chosen": "yes", "rejected": "no"},
                          'line 1: fields "prompt", "instruction" each give the prompt (prompt and alpaca forms)'),
    "label not a bool": ({"prompt": "Hi", "completion": "yes", "label": "yes"},
                         "line 1: field \"label\" must be true or false, got str 'yes'"),
    "label as 1": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                    "label": 1}, 'line 1: field "label" must be true or false, got int 1'),
    "label missing": ({"prompt": "Hi", "completion": "yes"}, 'line 1: field "label" is missing'),
    "completion missing": ({"prompt": "Hi", "label": True}, 'line 1: field "completion" is missing'),
    "kto messages ending with the user": ({"messages": [USER], "label": True},
                                          'line 1: field "messages[0].role": the last message must be the assistant'),
    "not preference data": ({"instruction": "Hi", "output": "Yo"},
                            'line 1: not a preference record: a pair needs "chosen" and "rejected"'),
    "not an object": ([1, 2], "line 1: expected a JSON object, got list"),
}


@pytest.mark.parametrize("name", CASES)
def test_each_malformed_record_is_one_line_naming_file_record_and_field(tmp_path, name):
    rec, message = CASES[name]
    path = write_jsonl(tmp_path / "p.jsonl", [rec])
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value).startswith(f"{path} {message}") and "\n" not in str(err.value)


def test_empty_file_and_bad_json_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=rf"^{empty}: no records found$"):
        read(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi", "chosen": "yes", "rejected": "no"}) + "\n{\"prompt\": \n")
    with pytest.raises(DataError, match=rf"^{bad} line 2: invalid JSON at column"):
        read(bad)
    skipped: list[dict] = []
    kind, records = read(bad, skipped=skipped)
    assert (kind, len(records), skipped[0]["line"]) == ("pairs", 1, 2)


def test_a_file_reads_as_what_its_first_record_is(tmp_path):
    """A kto record in a pairs file is a pair missing its answers, named so."""
    rows = [{"prompt": "Hi", "chosen": "yes", "rejected": "no"}, {"prompt": "Hi", "completion": "yes", "label": True}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(DataError, match=rf'^{path} line 2: field "chosen" is missing'):
        read(path)


def test_data_format_restricts_the_forms_read(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi", "chosen": "yes", "rejected": "no"}])
    assert read(path, "messages")[1][0].chosen == "yes"
    with pytest.raises(DataError, match=rf"^{path} line 1: a prompt-form record, but data.format=sharegpt"):
        read(path, "sharegpt")


def test_inspect_prints_the_one_line_error(tmp_path, tiny_model_dir, capsys):
    rec, message = CASES["chosen in the wrong role"]
    path = write_jsonl(tmp_path / "p.jsonl", [rec])
    assert cli.main(["inspect", str(path), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [next(x for x in err.splitlines() if message in x)]
    assert "Traceback" not in err and str(path) in err
