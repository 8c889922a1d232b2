"""ShareGPT records ("conversations" of {"from", "value"}): golden conversions, detection, refused roles."""
from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from slimtune.config import CHOICES, DataConfig
from slimtune.data import build
from slimtune.data.readers import DataError, read, read_prompts

# (record, golden messages)
GOLDEN = [
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "2+2?"},
                        {"from": "gpt", "value": "4"}, {"from": "human", "value": "times 3?"},
                        {"from": "gpt", "value": "12"}]},
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
      {"role": "assistant", "content": "4"}, {"role": "user", "content": "times 3?"},
      {"role": "assistant", "content": "12"}]),
    # LLaMA-Factory's tags user/assistant, and its top-level "system" column
    ({"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hey"}], "system": "S"},
     [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]),
    # unsloth's standardize_sharegpt output: role/content under "conversations"
    ({"conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
]


@pytest.mark.parametrize("fmt", ["auto", "sharegpt"])
def test_golden_conversions(tmp_path, fmt):
    path = write_jsonl(tmp_path / "sg.jsonl", [rec for rec, _ in GOLDEN])
    examples = read(path, fmt)
    assert [ex.messages for ex in examples] == [msgs for _, msgs in GOLDEN]
    assert [ex.where for ex in examples] == [f"{path} line {i}" for i in range(1, 5)]


def test_json_list_of_sharegpt_records(tmp_path):
    path = tmp_path / "sg.json"
    path.write_text(json.dumps([rec for rec, _ in GOLDEN[:2]], indent=2))
    assert [ex.messages for ex in read(path)] == [msgs for _, msgs in GOLDEN[:2]]


def test_format_choice_and_build(tmp_path, tokenizer):
    assert "sharegpt" in CHOICES["data.format"]
    path = write_jsonl(tmp_path / "sg.jsonl", [GOLDEN[0][0]] * 4)
    built = build(DataConfig(train=str(path), eval_size=1, template="chatml"), tokenizer, log=lambda *_: None)
    assert len(built.train) == 3 and len(built.eval) == 1
    assert tokenizer.decode(built.train[0].input_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" \
                                                          "Hello.<|im_end|>"


@pytest.mark.parametrize("conv, message", [
    ([{"from": "human", "value": "Hi"}, {"from": "function_call", "value": "{}"}],
     "field \"conversations[1].from\" is 'function_call', which slimtune cannot map to system/user/assistant (it "
     "reads human, user, gpt, assistant, system); convert or remove those turns"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "calling"}, {"from": "observation", "value": "42"},
      {"from": "gpt", "value": "42"}],
     "field \"conversations[2].from\" is 'observation', which slimtune cannot map"),
    ([{"from": "human", "value": "Hi"}, {"from": "human", "value": "again"}, {"from": "gpt", "value": "x"}],
     "field \"conversations[1].from\" is 'human'; turns must alternate user/assistant starting with user "
     "(expected 'assistant')"),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": ""}],
     'field "conversations[1].value" is empty; every assistant turn needs text'),
    ([{"from": "human", "value": "Hi"}, {"from": "gpt", "value": 3}],
     'field "conversations[1].value" must be a string, got int'),
    ([{"from": "human", "value": "Hi"}], "field \"conversations[0].from\": the last message must be the "
                                         "assistant's answer"),
    ([], 'field "conversations" must be a non-empty list of {"from", "value"} objects'),
    (["Hi"], 'field "conversations[0]" must be an object with "from" and "value"'),
], ids=["function_call", "observation", "not alternating", "empty answer", "value not a string", "no answer",
        "empty", "item not an object"])
def test_bad_sharegpt_records_name_the_field(tmp_path, conv, message):
    path = write_jsonl(tmp_path / "sg.jsonl", [{"conversations": conv}])
    with pytest.raises(DataError) as err:
        read(path)
    assert str(err.value).startswith(f"{path} line 1: {message}")


def test_sharegpt_prompts_for_generation(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}]},
                                              {"conversations": [{"from": "human", "value": "Hi"},
                                                                 {"from": "gpt", "value": "Hello"}]}])
    with pytest.raises(DataError, match='line 2: field "conversations": a prompt must end with a user message'):
        read_prompts(path)
    path = write_jsonl(tmp_path / "p.jsonl", [{"conversations": [{"from": "human", "value": "Hi"}], "id": 1}])
    prompts, raws = read_prompts(path)
    assert prompts[0].messages == [{"role": "user", "content": "Hi"}] and raws == [{"conversations": [
        {"from": "human", "value": "Hi"}], "id": 1}]


def test_conversations_beside_messages_is_refused(tmp_path):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = write_jsonl(tmp_path / "sg.jsonl", [{"messages": chat, "conversations": chat}])
    with pytest.raises(DataError, match='fields "messages", "conversations" belong to different formats'):
        read(path)


def test_datasets_folder_with_columns_of_two_formats(tmp_path):
    """save_to_disk keeps every column in every row (null where a row has none): nulls do not mix formats."""
    import datasets

    rows = [{"instruction": "Q", "output": "A", "conversations": None},
            {"instruction": None, "output": None, "conversations": [{"from": "human", "value": "Hi"},
                                                                   {"from": "gpt", "value": "Yo"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert [ex.messages[-1]["content"] for ex in read(tmp_path / "ds")] == ["A", "Yo"]
