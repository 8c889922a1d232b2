"""GRPO's rewards: the built-ins a config names (grpo.rewards) and those written in Python, which run only when
the person or program starting the run names them (`--reward file.py:fn`, `slimtune.fit(rewards=[fn])`): a
reward is code, and a config file or a run folder never makes slimtune run code.

A reward is a function `fn(prompts, completions, answers) -> list[float]`, TRL's shape: three lists of one
length (the prompt's user text, the sampled completion, the record's reference answer or None), and one number
per completion back. The step's reward is the weighted sum of every reward's number."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import re
import string
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..config.fields import REWARDS, GrpoConfig
from ..errors import SlimtuneError

RewardFn = Callable[[list[str], list[str], list["str | None"]], Sequence[float]]
FORMAT = r"^<think>.*?</think>\s*<answer>.*?</answer>$"
NEEDS_ANSWER = ("contains", "equals", "numeric")
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")


class RewardError(SlimtuneError, ValueError):
    """A reward that cannot be loaded, or that raised or returned something other than one number per
    completion."""


@dataclass(frozen=True)
class Reward:
    """One reward function and its weight in the step's sum."""
    name: str
    fn: Callable[..., Sequence[float]]
    weight: float = 1.0
    source: str = "built-in"  # the .py file of a user reward
    sha256: str | None = None  # of that file: a resume checks it is the same code
    lengths: bool = False  # built-in `length`: also given the completions' token counts

    def record(self) -> dict:
        """What the run folder keeps of it (rewards.json)."""
        out = {"name": self.name, "weight": self.weight, "source": self.source}
        return out | ({"sha256": self.sha256} if self.sha256 else {})


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace runs as one space: what `equals` and `contains` compare."""
    text = text.lower().translate(str.maketrans("", "", string.punctuation))
    return " ".join(text.split())


def last_number(text: str) -> float | None:
    """The last number written in `text` (thousands commas allowed), or None."""
    found = _NUMBER.findall(text or "")
    return float(found[-1].replace(",", "")) if found else None


def contains(prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
    """1.0 where the completion contains the reference answer (both normalised), else 0.0."""
    return [float(a is not None and normalise(a) in normalise(c)) for c, a in zip(completions, answers)]


def equals(prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
    """1.0 where the completion equals the reference answer after normalising case, whitespace, punctuation."""
    return [float(a is not None and normalise(a) == normalise(c)) for c, a in zip(completions, answers)]


def numeric(prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
    """1.0 where the completion's last number equals the reference answer's last number (math answers)."""
    out = []
    for c, a in zip(completions, answers):
        want, got = last_number(a or ""), last_number(c)
        out.append(float(want is not None and got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))))
    return out


def format_reward(pattern: str = "") -> RewardFn:
    """1.0 where the whole completion (outer whitespace aside) matches `pattern` (default FORMAT), dot matching
    newlines."""
    compiled = re.compile(pattern or FORMAT, re.DOTALL)

    def fmt(prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
        return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]
    return fmt


def length_reward(target: int, penalty: float) -> Callable[..., list[float]]:
    """Minus `penalty` per completion token beyond `target` tokens (0 within it)."""
    def length(prompts: list[str], completions: list[str], answers: list[str | None],
               lengths: list[int]) -> list[float]:
        return [-penalty * max(0, n - target) for n in lengths]
    return length


def builtins(cfg: GrpoConfig) -> list[Reward]:
    """The rewards grpo.rewards names (config/checks.py has refused anything but built-in names)."""
    made = {"contains": contains, "equals": equals, "numeric": numeric,
            "format": format_reward(cfg.format_regex), "length": length_reward(cfg.length_target, cfg.length_penalty)}
    out = []
    for spec in cfg.rewards:
        name, _, weight = spec.partition(":")
        if name not in REWARDS:
            raise RewardError(f"grpo.rewards: {name!r} is not a built-in reward ({', '.join(REWARDS)})")
        out.append(Reward(name, made[name], float(weight) if weight else 1.0, lengths=name == "length"))
    return out


def load_user(spec: str) -> Reward:
    """`path/to/file.py:fn[:weight]` from the command line: the file is imported (its code runs) and fn is taken
    from it; the file's sha256 goes into the run folder."""
    path, sep, rest = spec.partition(".py:")
    fn_name, _, weight = rest.partition(":")
    if not sep or not fn_name.isidentifier():
        raise RewardError(f"--reward {spec}: expected path/to/file.py:function (optionally :weight)")
    file = Path(path + ".py")
    if not file.is_file():
        raise RewardError(f"--reward {spec}: {file} does not exist")
    data = file.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    module_name = f"slimtune_reward_{digest[:16]}"
    loader = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(loader)
    sys.modules[module_name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as err:
        raise RewardError(f"--reward {spec}: importing {file} raised {type(err).__name__}: {err}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"--reward {spec}: {file} defines no function {fn_name}")
    try:
        w = float(weight) if weight else 1.0
    except ValueError:
        raise RewardError(f"--reward {spec}: the weight after the function's name must be a number") from None
    return Reward(fn_name, fn, w, str(file), digest)


def from_callable(fn: Callable[..., Sequence[float]], weight: float = 1.0) -> Reward:
    """A reward function passed to the Python API."""
    if not callable(fn):
        raise RewardError(f"rewards: {fn!r} is not a function (prompts, completions, answers) -> list[float]")
    return Reward(getattr(fn, "__name__", "reward"), fn, weight, "python")


@dataclass
class Scored:
    """The rewards of a batch of completions."""
    total: torch.Tensor  # [completions] weighted sums; NaN where a reward failed (data.on_bad_record=skip)
    per: dict[str, torch.Tensor]  # each reward's own numbers, by name
    failed: int  # completions whose reward failed


def _number(value: object) -> float | None:
    """A finite real number as a float, else None (bools count as 0/1, as Python's arithmetic has them)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def _call(r: Reward, prompts: list[str], completions: list[str], answers: list[str | None],
          lengths: list[int]) -> list[float | None]:
    """One number (or None: a non-number) per completion; raises RewardError when the call raised or returned
    the wrong count."""
    try:
        got = r.fn(prompts, completions, answers, lengths) if r.lengths else r.fn(prompts, completions, answers)
        got = list(got)
    except Exception as err:
        raise RewardError(f"raised {type(err).__name__}: {err}") from None
    if len(got) != len(completions):
        raise RewardError(f"returned {len(got)} values for {len(completions)} completions")
    return [_number(v) for v in got]


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _one(r: Reward, prompts: list[str], completions: list[str], answers: list[str | None], lengths: list[int],
         wheres: list[str], skip: bool) -> torch.Tensor:
    """Reward r for every completion; a failure names the record and the completion (or, skipping, is NaN)."""
    try:
        values = _call(r, prompts, completions, answers, lengths)
    except RewardError as whole:  # find which completions it fails on: one call each
        values = []
        for i in range(len(completions)):
            try:
                values += _call(r, prompts[i:i + 1], completions[i:i + 1], answers[i:i + 1], lengths[i:i + 1])
            except RewardError as err:
                if not skip:
                    raise RewardError(f"reward {r.name} {err} on {wheres[i]}, completion {_short(completions[i])}; "
                                      "fix the reward (data.on_bad_record=skip leaves such completions out)") from None
                values.append(None)
        if None not in values:  # each alone passes, the batch does not: no completion is to blame
            if not skip:
                raise RewardError(f"reward {r.name} {whole} on the batch of {wheres[0]} to {wheres[-1]} (first "
                                  f"completion {_short(completions[0])}); fix the reward") from None
            values = [None] * len(completions)
    for i, v in enumerate(values):
        if v is None and not skip:
            raise RewardError(f"reward {r.name} returned a non-number for {wheres[i]}, completion "
                              f"{_short(completions[i])}; a reward returns one finite number per completion")
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)


def score(rewards: list[Reward], prompts: list[str], completions: list[str], answers: list[str | None],
          lengths: list[int], wheres: list[str], skip: bool = False) -> Scored:
    """Every reward of every completion and their weighted sum. skip=False: the first failure stops the run
    with a RewardError naming reward, record and completion; skip=True: that completion's total is NaN."""
    per = {r.name: _one(r, prompts, completions, answers, lengths, wheres, skip) for r in rewards}
    total = torch.zeros(len(completions), dtype=torch.float64)
    for r in rewards:
        total = total + r.weight * per[r.name]
    return Scored(total, per, int(torch.isnan(total).sum()))


RECORD = "rewards.json"  # in the run folder: the rewards a run trained with


def write_record(out_dir: Path, rewards: list[Reward]) -> None:
    """The rewards used (name, weight, source; a user file's sha256), for a resume to check."""
    (Path(out_dir) / RECORD).write_text(json.dumps([r.record() for r in rewards], indent=1) + "\n", encoding="utf-8")


def check_record(out_dir: Path, rewards: list[Reward]) -> None:
    """A resume of a run trained with a user reward needs --reward again, with a file of the same content."""
    path = Path(out_dir) / RECORD
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved = [s for s in saved if isinstance(s, dict) and s.get("sha256")]
    except (OSError, ValueError, AttributeError):
        raise RewardError(f"{path}: missing or unreadable, so the rewards this run trained with are unknown; start "
                          "a new run (--overwrite)") from None
    given = {r.name: r for r in rewards if r.sha256}
    for s in saved:
        r = given.get(s.get("name"))
        if r is None:
            raise RewardError(f"{out_dir} trained with the reward {s.get('name')} from {s.get('source')}: resume "
                              f"with --reward {s.get('source')}:{s.get('name')} (slimtune never runs code a run "
                              "folder names)")
        if r.sha256 != s["sha256"]:
            raise RewardError(f"--reward {r.source}:{r.name}: the file differs from the one this run trained with "
                              f"(sha256 {r.sha256[:12]}... now, {str(s['sha256'])[:12]}... then); resume with that "
                              "file, or start a new run")
    extra = [n for n in given if n not in {s.get("name") for s in saved}]
    if extra:
        raise RewardError(f"--reward {given[extra[0]].source}:{extra[0]}: this run did not train with it; resume "
                          "with its own rewards, or start a new run")
