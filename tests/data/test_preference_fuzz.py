"""Fuzz the preference readers and encoding: random records in every form, part well-formed, part junk. Only
slimtune's own errors escape, and with data.on_bad_record=skip every record is read or listed as skipped."""
from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slimtune.config import DataConfig
from slimtune.data.checks import DataError
from slimtune.data.pref_encode import encode_records
from slimtune.data.pref_read import read

KEYS = ["prompt", "chosen", "rejected", "completion", "label", "instruction", "input", "system", "history",
        "messages", "conversations", "role", "content", "from", "value"]
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                   st.sampled_from(["", " ", "user", "assistant", "gpt", "human", "system", "<|im_end|>"]))
VALUE = st.recursive(SCALAR, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                    st.dictionaries(st.sampled_from(KEYS), kids, max_size=3)),
                     max_leaves=10)
ROLE = st.sampled_from(["user", "assistant", "system", "human", "gpt", "robot"])
TURN = st.one_of(st.fixed_dictionaries({"role": ROLE, "content": st.text(max_size=6)}),
                 st.fixed_dictionaries({"from": ROLE, "value": st.text(max_size=6)}),
                 st.fixed_dictionaries({}, optional={"role": VALUE, "content": VALUE}))
ANSWER = st.one_of(st.text(max_size=8), TURN, st.lists(TURN, max_size=2), VALUE)
PROMPT = st.one_of(st.text(max_size=8), st.lists(TURN, max_size=4))
RECORD = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), VALUE, max_size=4),
    st.fixed_dictionaries({"prompt": PROMPT, "chosen": ANSWER, "rejected": ANSWER}, optional={"system": VALUE}),
    st.fixed_dictionaries({"chosen": st.lists(TURN, max_size=4), "rejected": st.lists(TURN, max_size=4)}),
    st.fixed_dictionaries({"conversations": st.lists(TURN, max_size=3), "chosen": ANSWER, "rejected": ANSWER}),
    st.fixed_dictionaries({"instruction": VALUE, "chosen": ANSWER, "rejected": ANSWER}, optional={"history": VALUE}),
    st.fixed_dictionaries({"prompt": PROMPT, "completion": ANSWER, "label": VALUE}),
    st.fixed_dictionaries({"messages": st.lists(TURN, max_size=4), "label": st.booleans()}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(RECORD, min_size=1, max_size=6))
def test_any_records_read_or_skip_with_slimtune_errors_only(tmp_path, tokenizer, rows):
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    skipped: list[dict] = []
    try:
        _, records = read(path, skipped=skipped, log=lambda _: None)
    except DataError as err:  # every record bad: the message names the first
        assert "every one of its" in str(err) and len(skipped) == len(rows)
        return
    assert len(records) + len(skipped) == len(rows)
    pairs, stats = encode_records(records, tokenizer, DataConfig(template="chatml", max_len=24), skipped)
    assert len(pairs) == stats.records and len(pairs) + len(skipped) == len(rows)
    assert all(len(p.prompt) + max(len(p.chosen), len(p.rejected)) <= 24 and p.chosen for p in pairs)
