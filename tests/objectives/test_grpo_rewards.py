"""GRPO's rewards: the built-ins, the rule that only the command line or the calling program names reward code,
failures that name the record and the completion, the run folder's record of the rewards; and the prompts'
reference answers read from each format."""
from __future__ import annotations

import math

import pytest

from slimtune import config
from slimtune.config import Config, ConfigError
from slimtune.config.fields import GrpoConfig
from slimtune.data.prompts import build_prompts
from slimtune.data.readers import DataError
from slimtune.objectives import rewards as R

from conftest import write_jsonl

P, A = ["q"] * 4, ["Paris", "Paris", "42", None]


def test_builtins_score_as_documented():
    comps = ["It is paris!", "PARIS", "so 6*7 = 42.0", "<think>hm</think>\n<answer>x</answer>"]
    assert R.contains(P, comps, A) == [1.0, 1.0, 1.0, 0.0]  # "42" is inside "420" once "." is dropped
    assert R.equals(P, comps, A) == [0.0, 1.0, 0.0, 0.0]
    assert R.numeric(P, comps + ["total: 1,000"], ["7", "1,000", "42", "3", "1000"]) == [0.0, 0.0, 1.0, 0.0, 1.0]
    assert R.format_reward()(P, comps, A) == [0.0, 0.0, 0.0, 1.0]
    assert R.format_reward(r"<answer>.*</answer>")(P, ["<answer>a\nb</answer>", "no"], A[:2]) == [1.0, 0.0]
    assert R.length_reward(4, 0.5)(P, comps, A, [2, 4, 6, 10]) == [0.0, 0.0, -1.0, -3.0]
    assert R.last_number("1,234.5 then -3") == -3.0 and R.last_number("none") is None


def test_weights_from_the_config_and_the_weighted_sum():
    made = R.builtins(GrpoConfig(rewards=["contains:2", "equals:0.5"]))
    assert [(r.name, r.weight) for r in made] == [("contains", 2.0), ("equals", 0.5)]
    scored = R.score(made, P[:2], ["paris", "Paris is big"], A[:2], [1, 3], ["a line 1", "a line 2"])
    assert scored.total.tolist() == [2.5, 2.0] and scored.failed == 0


@pytest.mark.parametrize("spec,message", [
    ("my_rewards.py:fn", "grpo.rewards: 'my_rewards.py:fn' names Python code, which a config file never runs; pass "
                         "it on the command line (--reward my_rewards.py:fn) or to slimtune.fit(rewards=[fn])"),
    ("lib/r:fn", "names Python code"),
    ("accuracy", "grpo.rewards: 'accuracy' is not a built-in reward (contains, equals, format, length, numeric)"),
    ("contains:x", "the weight after ':' must be a finite number"),
])
def test_a_config_naming_reward_code_or_an_unknown_reward_is_refused(tmp_path, spec, message):
    path = tmp_path / "c.yaml"
    path.write_text(f"grpo:\n  rewards: ['{spec}']\n")
    with pytest.raises(ConfigError, match="grpo.rewards") as err:
        config.load(path)
    assert message in str(err.value)


def test_a_format_regex_that_does_not_compile_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("grpo:\n  format_regex: '<answer>(.*'\n")
    with pytest.raises(ConfigError, match=r"grpo.format_regex: not a regular expression Python's re reads "
                                          r"\(missing \), unterminated subpattern"):
        config.load(path)


def _user(tmp_path, body: str) -> R.Reward:
    (tmp_path / "mine.py").write_text(body)
    return R.load_user(f"{tmp_path / 'mine.py'}:fn")


WHERES = ["p.jsonl line 1", "p.jsonl line 1", "p.jsonl line 2", "p.jsonl line 2"]
COMPS = ["a", "bb", "ccc", "boom"]


@pytest.mark.parametrize("body,message", [
    ("def fn(p, c, a):\n    if 'boom' in c:\n        raise KeyError('x')\n    return [1.0] * len(c)\n",
     "reward fn raised KeyError: 'x' on p.jsonl line 2, completion 'boom'"),
    ("def fn(p, c, a):\n    return ['yes' if x == 'ccc' else 1 for x in c]\n",
     "reward fn returned a non-number for p.jsonl line 2, completion 'ccc'"),
    ("def fn(p, c, a):\n    return [float('nan') if x == 'bb' else 1 for x in c]\n",
     "reward fn returned a non-number for p.jsonl line 1, completion 'bb'"),
    ("def fn(p, c, a):\n    return [1.0]\n",
     "reward fn returned 1 values for 4 completions on the batch of p.jsonl line 1 to p.jsonl line 2 (first "
     "completion 'a')"),
])
def test_a_user_reward_that_raises_or_returns_non_numbers_stops_naming_record_and_completion(tmp_path, body, message):
    reward = _user(tmp_path, body)
    with pytest.raises(R.RewardError) as err:
        R.score([reward], ["q"] * 4, COMPS, [None] * 4, [1, 2, 3, 4], WHERES)
    assert message in str(err.value)


def test_skipping_bad_records_leaves_the_failed_completion_out_as_nan(tmp_path):
    reward = _user(tmp_path, "def fn(p, c, a):\n    if 'boom' in c:\n        raise KeyError('x')\n"
                             "    return [float(len(x)) for x in c]\n")
    scored = R.score([reward], ["q"] * 4, COMPS, [None] * 4, [1, 2, 3, 4], WHERES, skip=True)
    assert scored.total.tolist()[:3] == [1.0, 2.0, 3.0] and math.isnan(scored.total[3]) and scored.failed == 1


def test_load_user_refusals(tmp_path):
    with pytest.raises(R.RewardError, match="expected path/to/file.py:function"):
        R.load_user("nofile")
    with pytest.raises(R.RewardError, match="does not exist"):
        R.load_user(f"{tmp_path / 'absent.py'}:fn")
    with pytest.raises(R.RewardError, match="defines no function other"):
        _user(tmp_path, "def fn(p, c, a):\n    return []\n") and R.load_user(f"{tmp_path / 'mine.py'}:other")
    assert R.load_user(f"{tmp_path / 'mine.py'}:fn:0.5").weight == 0.5


def test_a_resume_needs_the_same_reward_file(tmp_path):
    reward = _user(tmp_path, "def fn(p, c, a):\n    return [0.0] * len(c)\n")
    R.write_record(tmp_path, [*R.builtins(GrpoConfig()), reward])
    R.check_record(tmp_path, [reward])  # the same file: goes on
    with pytest.raises(R.RewardError, match=r"trained with the reward fn from .*mine.py: resume with --reward "):
        R.check_record(tmp_path, [])
    changed = _user(tmp_path, "def fn(p, c, a):\n    return [1.0] * len(c)\n")
    with pytest.raises(R.RewardError, match=r"the file differs from the one this run trained with \(sha256 "):
        R.check_record(tmp_path, [changed])


def test_prompts_and_reference_answers_from_each_format(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
        {"instruction": "Say hi."},
        {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris"}]},
        {"messages": [{"role": "user", "content": "No answer here"}]},
        {"prompt": "What is 6 x 7?", "answer": 42},
    ])
    cfg = Config()
    cfg.data.train, cfg.data.max_len = str(path), 64
    built = build_prompts(cfg.data, tokenizer, needs_answer=False, log=lambda m: None)
    assert [(r.text, r.answer) for r in built.train] == [("Add 2 and 3.", "5"), ("Say hi.", None),
                                                         ("Capital of France?", "Paris"), ("No answer here", None),
                                                         ("What is 6 x 7?", "42")]
    assert tokenizer.decode(built.train[2].prompt_ids) == \
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(DataError, match=r"p.jsonl line 2: no reference answer .* contains, equals and numeric"):
        build_prompts(cfg.data, tokenizer, needs_answer=True, log=lambda m: None)
    write_jsonl(path, [{"prompt": "x", "answer": ["a"]}])
    with pytest.raises(DataError, match='p.jsonl line 1: field "answer" must be a string'):
        build_prompts(cfg.data, tokenizer, needs_answer=False, log=lambda m: None)
