"""Preference records: each pair and kto form read, the prompt masked and the answers trained on exact token ids
(the same ids and labels SFT gives prompt + answer), the prompt cut on the left first, identical and empty pairs
refused or skipped and counted, kto reading pairs, and the train/eval split."""
from __future__ import annotations

import pytest

from conftest import write_jsonl
from slimtune.config import Config, DataConfig
from slimtune.data import DataError, encode_examples, split
from slimtune.data.pairs import EncodedPair
from slimtune.data.pref_encode import KEEP_PROMPT, encode_record, encode_records
from slimtune.data.pref_read import PrefRecord, read
from slimtune.data.preference import build_pairs
from slimtune.data.readers import Example

U = {"role": "user", "content": "How are you today?"}
A = {"role": "assistant", "content": "I am a small model."}
SYS = {"role": "system", "content": "Be brief."}
CHOSEN, REJECTED = "The capital of France is Paris.", "the quick brown fox"

PAIR_FORMS = {
    "trl strings": ({"prompt": "Hello there!", "chosen": CHOSEN, "rejected": REJECTED},
                    [{"role": "user", "content": "Hello there!"}]),
    "trl strings + system": ({"prompt": "Hello there!", "system": "Be brief.", "chosen": CHOSEN, "rejected": REJECTED},
                             [SYS, {"role": "user", "content": "Hello there!"}]),
    "trl conversational": ({"prompt": [SYS, U, A, U], "chosen": [{"role": "assistant", "content": CHOSEN}],
                            "rejected": [{"role": "assistant", "content": REJECTED}]}, [SYS, U, A, U]),
    "trl implicit prompt": ({"chosen": [U, A, U, {"role": "assistant", "content": CHOSEN}],
                             "rejected": [U, A, U, {"role": "assistant", "content": REJECTED}]}, [U, A, U]),
    "llamafactory alpaca": ({"instruction": "Give three tips", "input": "for sleep", "system": "Be brief.",
                             "history": [["Hi", "Hello"]], "chosen": CHOSEN, "rejected": REJECTED},
                            [SYS, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                             {"role": "user", "content": "Give three tips\nfor sleep"}]),
    "llamafactory sharegpt": ({"conversations": [{"from": "system", "value": "Be brief."},
                                                 {"from": "human", "value": "How are you today?"}],
                               "chosen": {"from": "gpt", "value": CHOSEN},
                               "rejected": {"from": "gpt", "value": REJECTED}}, [SYS, U]),
    "sharegpt + top-level system": ({"conversations": [{"from": "human", "value": "How are you today?"}],
                                     "system": "Be brief.", "chosen": {"from": "gpt", "value": CHOSEN},
                                     "rejected": {"from": "gpt", "value": REJECTED}}, [SYS, U]),
    "messages + turns": ({"messages": [U], "chosen": {"role": "assistant", "content": CHOSEN},
                          "rejected": {"role": "assistant", "content": REJECTED}}, [U]),
}


@pytest.mark.parametrize("name", PAIR_FORMS)
def test_each_pair_form_reads_to_prompt_and_answers(tmp_path, name):
    rec, prompt = PAIR_FORMS[name]
    kind, records = read(write_jsonl(tmp_path / "p.jsonl", [rec]), log=lambda _: None)
    assert kind == "pairs"
    assert (records[0].prompt, records[0].chosen, records[0].rejected, records[0].label) == \
        (prompt, CHOSEN, REJECTED, None)


KTO_FORMS = {
    "trl strings": ({"prompt": "Hello there!", "completion": CHOSEN, "label": True},
                    [{"role": "user", "content": "Hello there!"}], True),
    "trl conversational": ({"prompt": [U, A, U], "completion": [{"role": "assistant", "content": CHOSEN}],
                            "label": False}, [U, A, U], False),
    "llamafactory messages": ({"messages": [U, A, U, {"role": "assistant", "content": CHOSEN}], "label": True},
                              [U, A, U], True),
    "sharegpt conversations": ({"conversations": [{"from": "human", "value": "How are you today?"},
                                                  {"from": "gpt", "value": CHOSEN}], "label": False}, [U], False),
}


@pytest.mark.parametrize("name", KTO_FORMS)
def test_each_kto_form_reads_to_prompt_completion_and_label(tmp_path, name):
    rec, prompt, label = KTO_FORMS[name]
    kind, records = read(write_jsonl(tmp_path / "k.jsonl", [rec]), log=lambda _: None)
    assert kind == "kto"
    assert (records[0].prompt, records[0].chosen, records[0].rejected, records[0].label) == (prompt, CHOSEN, "", label)


def _rec(prompt: list[dict], chosen: str = CHOSEN, rejected: str = REJECTED, label: bool | None = None) -> PrefRecord:
    return PrefRecord(prompt, chosen, rejected, "p.jsonl line 1", label)


def _sft(tokenizer, cfg: DataConfig, prompt: list[dict], answer: str):
    """SFT's encoding of prompt + answer (only the last answer trained when the prompt holds none)."""
    enc, _ = encode_examples([Example(prompt + [{"role": "assistant", "content": answer}], "x")], tokenizer, cfg)
    return enc[0]


def test_prompt_masked_answers_trained_with_end_token_on_exact_ids(tokenizer):
    cfg = DataConfig(template="auto", max_len=512)
    pair = encode_record(_rec([U]), tokenizer, cfg)
    text = "<|im_start|>user\nHow are you today?<|im_end|>\n<|im_start|>assistant\n"
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert pair.prompt == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert pair.chosen == tokenizer(CHOSEN, add_special_tokens=False)["input_ids"] + [end]
    assert pair.rejected == tokenizer(REJECTED, add_special_tokens=False)["input_ids"] + [end]
    seq = pair.chosen_sequence()
    assert seq.labels == [-100] * len(pair.prompt) + pair.chosen and seq.labels[-1] == end == tokenizer.eos_token_id
    for answer, ids in ((CHOSEN, pair.chosen), (REJECTED, pair.rejected)):  # the ids and labels SFT trains on
        sft = _sft(tokenizer, cfg, [U], answer)
        assert (pair.prompt + ids, pair.sequence(ids).labels) == (sft.input_ids, sft.labels)


def test_a_header_token_joined_to_the_answer_goes_to_both_answers(tokenizer):
    """llama2's header ends with a space that the tokenizer joins to the answer's first word: the prompt is
    what both encodings share, so each sequence is still SFT's own encoding, ids and labels."""
    cfg = DataConfig(template="llama2", max_len=512)
    pair = encode_record(_rec([U], "The fox", "the dog"), tokenizer, cfg)
    for answer, ids in (("The fox", pair.chosen), ("the dog", pair.rejected)):
        sft = _sft(tokenizer, cfg, [U], answer)
        assert pair.prompt + ids == sft.input_ids
        assert pair.sequence(ids).labels == sft.labels
    assert pair.chosen[-1] == pair.rejected[-1] == tokenizer.eos_token_id


def test_answers_in_the_history_are_masked_as_prompt(tokenizer):
    pair = encode_record(_rec([SYS, U, A, U]), tokenizer, DataConfig(template="chatml", max_len=512))
    assert "I am a small model." in tokenizer.decode(pair.prompt)
    assert tokenizer.decode(pair.chosen) == CHOSEN + "<|im_end|>"
    assert tokenizer.decode(pair.rejected) == REJECTED + "<|im_end|>"


def test_kto_record_has_its_completion_and_no_rejected(tokenizer):
    pair = encode_record(_rec([U], label=False, rejected=""), tokenizer, DataConfig(template="chatml", max_len=512))
    assert (pair.label, pair.rejected, pair.paired) == (False, [], False)
    assert tokenizer.decode(pair.chosen) == CHOSEN + "<|im_end|>"


def test_prompt_cut_on_the_left_first_then_the_answers_on_the_right(tokenizer):
    cfg = DataConfig(template="chatml", max_len=512)
    full = encode_record(_rec([U]), tokenizer, cfg)
    longest = len(full.prompt) + max(len(full.chosen), len(full.rejected))
    cut = encode_record(_rec([U]), tokenizer, DataConfig(template="chatml", max_len=longest - 3))
    assert (cut.prompt, cut.chosen, cut.rejected) == (full.prompt[3:], full.chosen, full.rejected)
    assert (cut.truncated, cut.prompt_cut, cut.answer_cut) == (True, 3, False)
    # past what the prompt can give: KEEP_PROMPT of its last tokens stay, the answers are cut on the right
    room = 9  # max_len 17: its half (a floor for the answers) leaves the prompt its KEEP_PROMPT tokens
    tight = encode_record(_rec([U]), tokenizer, DataConfig(template="chatml", max_len=KEEP_PROMPT + room))
    assert tight.prompt == full.prompt[-KEEP_PROMPT:]
    assert (tight.chosen, tight.rejected) == (full.chosen[:room], full.rejected[:room])
    assert (tight.prompt_cut, tight.answer_cut) == (len(full.prompt) - KEEP_PROMPT, True)
    _, stats = encode_records([_rec([U])] * 2, tokenizer, DataConfig(template="chatml", max_len=KEEP_PROMPT + room))
    assert (stats.records, stats.truncated, stats.prompt_cut, stats.answer_cut) == (2, 2, 2, 2)


BAD = [_rec([U], CHOSEN, CHOSEN), _rec([U], "", REJECTED), _rec([U], CHOSEN, "")]


def test_identical_and_empty_pairs_are_refused_naming_the_record(tokenizer):
    cfg = DataConfig(template="chatml", max_len=512)
    with pytest.raises(DataError, match=r"^p.jsonl line 1: chosen and rejected are the same answer, .*"
                                        r"data.on_bad_record=skip"):
        encode_records([BAD[0]], tokenizer, cfg)
    with pytest.raises(DataError, match=r"^p.jsonl line 1: the rejected answer is empty; a pair needs two"):
        encode_records([BAD[2]], tokenizer, cfg)


def test_identical_and_empty_pairs_are_skipped_listed_and_counted(tokenizer):
    skipped: list[dict] = []
    good = _rec([U])
    pairs, stats = encode_records([good, *BAD], tokenizer, DataConfig(template="chatml", max_len=512), skipped)
    assert len(pairs) == 1 and (stats.records, stats.identical, stats.empty) == (1, 1, 2)
    assert len(skipped) == 3 and stats.first_bad == ["p.jsonl line 1"] * 3
    assert "the chosen answer is empty" in skipped[1]["reason"]


def test_answers_identical_within_max_len_are_counted_as_identical(tokenizer):
    same_start = _rec([U], CHOSEN + " the quick brown fox", CHOSEN + " 1 2 3")
    with pytest.raises(DataError, match=r"the same in their first 9 tokens, all that data.max_len=17 leaves"):
        encode_records([same_start], tokenizer, DataConfig(template="chatml", max_len=KEEP_PROMPT + 9))


def _cfg(path, objective: str = "dpo", **data) -> Config:
    cfg = Config()
    cfg.data.train, cfg.data.template, cfg.train.objective = str(path), "chatml", objective
    for key, value in data.items():
        setattr(cfg.data, key, value)
    return cfg


def _pairs(n: int) -> list[dict]:
    return [{"prompt": f"Hello there! {i}", "chosen": CHOSEN, "rejected": REJECTED} for i in range(n)]


def test_build_pairs_holds_out_the_records_data_split_does(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(10))
    built = build_pairs(_cfg(path, eval_size=3, seed=7), tokenizer, log=lambda _: None)
    _, records = read(path)
    train, held = split(records, 3, 7)
    assert [p.where for p in built.eval] == [r.where for r in held] and len(held) == 3
    assert [p.where for p in built.train] == [r.where for r in train]
    assert all(isinstance(p, EncodedPair) and p.paired for p in built.train + built.eval)


def test_build_pairs_reads_data_eval_and_skips_bad_pairs_with_a_log_line(tmp_path, tokenizer):
    rows = _pairs(3) + [{"prompt": "Hi", "chosen": "same", "rejected": "same"}]
    path, held = write_jsonl(tmp_path / "p.jsonl", rows), write_jsonl(tmp_path / "e.jsonl", _pairs(2))
    lines: list[str] = []
    built = build_pairs(_cfg(path, eval=str(held), on_bad_record="skip"), tokenizer, log=lines.append)
    assert (len(built.train), len(built.eval), built.train_stats.identical) == (3, 2, 1)
    assert [s["line"] for s in built.skipped] == [4]
    assert any(line.startswith("train: 3 pairs") and f"1 identical and 0 empty left out (first: {path} line 4)"
               in line for line in lines)
    with pytest.raises(DataError, match=rf"^{path} line 4: chosen and rejected are the same answer"):
        build_pairs(_cfg(path, eval=str(held)), tokenizer, log=lambda _: None)


def test_train_on_prompt_is_reported_as_without_effect(tmp_path, tokenizer):
    lines: list[str] = []
    built = build_pairs(_cfg(write_jsonl(tmp_path / "p.jsonl", _pairs(2)), "orpo", train_on_prompt=True, eval_size=0),
                        tokenizer, log=lines.append)
    assert "warning: data.train_on_prompt has no effect with train.objective=orpo" in "\n".join(lines)
    assert all(x == -100 for x in built.train[0].chosen_sequence().labels[: len(built.train[0].prompt)])


def test_kto_reads_pairs_as_a_desirable_and_an_undesirable_record(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", _pairs(4))
    built = build_pairs(_cfg(path, "kto", eval_size=1), tokenizer, log=lambda _: None)
    assert [p.label for p in built.train] == [True, False] * 3 and len(built.eval) == 2
    assert (built.train_stats.desirable, built.train_stats.undesirable) == (3, 3)
    assert {p.where for p in built.eval}.isdisjoint(p.where for p in built.train)  # a pair's halves stay together


def test_pair_objectives_refuse_unpaired_records(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Hi", "completion": "Hello", "label": True}] * 2)
    with pytest.raises(DataError, match=r"unpaired records .* train.objective=dpo .* use train.objective=kto"):
        build_pairs(_cfg(path, "dpo"), tokenizer, log=lambda _: None)


def test_a_datasets_folder_reads_with_its_null_columns(tmp_path):
    """save_to_disk gives every row every column (null where a row had none) and bools as bools."""
    import datasets

    rows = [{"prompt": [U], "chosen": [{"role": "assistant", "content": CHOSEN}],
             "rejected": [{"role": "assistant", "content": REJECTED}], "system": None},
            {"prompt": [U], "chosen": [{"role": "assistant", "content": REJECTED}],
             "rejected": [{"role": "assistant", "content": CHOSEN}], "system": "Be brief."}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "pairs"))
    kind, records = read(tmp_path / "pairs", log=lambda _: None)
    assert kind == "pairs" and [r.prompt for r in records] == [[U], [SYS, U]]
    assert [r.where for r in records] == [f"{tmp_path / 'pairs'} record {i}" for i in range(2)]
    kto = [{"messages": [U, {"role": "assistant", "content": CHOSEN}], "label": i % 2 == 0} for i in range(3)]
    datasets.Dataset.from_list(kto).save_to_disk(str(tmp_path / "kto"))
    kind, records = read(tmp_path / "kto", log=lambda _: None)
    assert kind == "kto" and [r.label for r in records] == [True, False, True]


def test_malformed_records_are_skipped_and_listed_with_on_bad_record_skip(tmp_path, tokenizer):
    rows = _pairs(3) + [{"prompt": "Hi", "chosen": 5, "rejected": "no"}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    lines: list[str] = []
    built = build_pairs(_cfg(path, on_bad_record="skip", eval_size=0), tokenizer, log=lines.append)
    assert len(built.train) == 3 and [s["line"] for s in built.skipped] == [4]
    assert f'skipped 1 bad records (data.on_bad_record=skip); first: {path} line 4: field "chosen" must be' \
        in "\n".join(lines)
