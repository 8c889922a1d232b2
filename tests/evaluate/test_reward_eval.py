"""`slimtune eval RUN --data prompts.jsonl [--reward file.py:fn]` on the tiny random model: the mean rewards of
the run's completions of held-out prompts equal the rewards computed here from completions decoded here (greedy),
sampling is seeded, and a reward in a file runs only when the command line names it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import GenerationConfig

from slimtune import cli
from slimtune.config import MethodConfig, load
from slimtune.data.prompts import PromptRecord
from slimtune.evaluate.rewarded import greedy, objective_for
from slimtune.methods import apply
from slimtune.objectives.rewards import from_callable
from slimtune.trained import load_run

from conftest import make_model, write_jsonl

E_REWARD = "def share_of_e(prompts, completions, answers):\n" \
           "    return [sum(ch == 'e' for ch in c) / max(len(c), 1) for c in completions]\n"
HELD = [{"prompt": f"Tell me about {w}.", "answer": w} for w in ("rain", "a cat", "seven", "the sea", "bread")]


def _share_of_e(text: str) -> float:
    return sum(ch == "e" for ch in text) / max(len(text), 1)


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A one-step GRPO run trained with the built-in rewards length (weight 2) and contains, and a file's reward."""
    tmp = tmp_path_factory.mktemp("grpo-eval")
    data = write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"Say {w}.", "answer": w} for w in ("up", "red", "one")])
    (tmp / "rewards.py").write_text(E_REWARD)
    tree = {"model": {"path": str(tiny_model_dir)}, "data": {"train": str(data), "max_len": 64},
            "method": {"name": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
            "train": {"objective": "grpo", "output_dir": str(tmp / "run"), "lr": 1e-2, "max_steps": 1,
                      "micro_batch_size": 1, "grad_accum": 1, "precision": "fp32", "device": "cpu", "save_every": 0,
                      "seed": 3},
            "grpo": {"num_generations": 2, "max_new_tokens": 7, "rewards": ["length:2", "contains"],
                     "length_target": 2, "length_penalty": 0.5}}
    (tmp / "grpo.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(tmp / "grpo.yaml"), "--no-progress", "--reward",
                     f"{tmp / 'rewards.py'}:share_of_e"]) == 0
    write_jsonl(tmp / "held.jsonl", HELD)
    return tmp / "run"


def _scores(out: Path) -> tuple[dict, list[dict]]:
    return (json.loads((out / "scores.json").read_text()),
            [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()])


def _greedy_by_hand(run: Path, max_new_tokens: int) -> list[tuple[str, int]]:
    """(text, tokens) of the greedy completion of every held-out prompt, rendered and decoded here."""
    model, tokenizer, _ = load_run(run)
    out = []
    for row in HELD:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": row["prompt"]}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
        gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
        with torch.no_grad():
            new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)[0,
                                                                                                               ids.shape[1]:]
        stop = (new == tokenizer.eos_token_id).nonzero()
        n = int(stop[0]) + 1 if len(stop) else len(new)
        out.append((tokenizer.decode(new[:n], skip_special_tokens=True), n))
    return out


def test_greedy_mean_rewards_equal_a_hand_computation(grpo_run, capsys):
    out = grpo_run.parent / "eval-greedy"
    rewards = grpo_run.parent / "rewards.py"
    assert cli.main(["eval", str(grpo_run), "--data", str(grpo_run.parent / "held.jsonl"), "--output", str(out),
                     "--reward", f"{rewards}:share_of_e"]) == 0
    scores, rows = _scores(out)
    by_hand = _greedy_by_hand(grpo_run, 7)  # the run's grpo.max_new_tokens
    assert [(r["completion"], r["tokens"]) for r in rows] == by_hand
    length = [-0.5 * max(0, n - 2) for _, n in by_hand]
    contains = [float(h["answer"].lower() in " ".join(t.lower().split())) for h, (t, _) in zip(HELD, by_hand)]
    e = [_share_of_e(t) for t, _ in by_hand]
    total = [2 * a + b + c for a, b, c in zip(length, contains, e)]
    assert scores["prompts"] == 5 and scores["samples"] == 1 and scores["decoding"] == "greedy"
    assert scores["rewards/length/mean"] == pytest.approx(sum(length) / 5, abs=1e-12)
    assert scores["rewards/contains/mean"] == pytest.approx(sum(contains) / 5, abs=1e-12)
    assert scores["rewards/share_of_e/mean"] == pytest.approx(sum(e) / 5, abs=1e-12)
    assert scores["reward"] == pytest.approx(sum(total) / 5, abs=1e-12)
    assert scores["completion_length"] == pytest.approx(sum(n for _, n in by_hand) / 5)
    assert [r["reward"] for r in rows] == pytest.approx(total, abs=1e-12)
    assert sum(length) < 0 and sum(e) > 0  # the numbers compared are not all zero
    assert f"eval: 5 prompts x 1 completions (greedy): mean reward {sum(total) / 5:.4f}" in capsys.readouterr().out


def test_a_file_reward_runs_only_when_named(grpo_run):
    out = grpo_run.parent / "eval-builtins"
    assert cli.main(["eval", str(grpo_run), "--data", str(grpo_run.parent / "held.jsonl"), "--output",
                     str(out), "--limit", "3"]) == 0
    scores, rows = _scores(out)
    assert scores["prompts"] == 3 and len(rows) == 3
    assert [r["name"] for r in scores["rewards"]] == ["length", "contains"]
    assert "rewards/share_of_e/mean" not in scores and "share_of_e" not in rows[0]


def test_sampling_is_seeded(grpo_run):
    held = str(grpo_run.parent / "held.jsonl")

    def sampled(name: str, seed: int) -> tuple[dict, list[dict]]:
        out = grpo_run.parent / name
        assert cli.main(["eval", str(grpo_run), "--data", held, "--output", str(out), "--samples", "3",
                         "--temperature", "1.0", "--seed", str(seed), "--max-new-tokens", "5"]) == 0
        return _scores(out)

    (a, rows_a), (b, rows_b), (_, rows_c) = sampled("s1", 11), sampled("s2", 11), sampled("s3", 12)
    assert a["samples"] == 3 and len(rows_a) == 15 and a["decoding"] == "temperature 1, seed 11"
    assert rows_a == rows_b and a["reward"] == b["reward"]
    assert [r["completion"] for r in rows_a] != [r["completion"] for r in rows_c]
    assert a["reward"] == pytest.approx(sum(r["reward"] for r in rows_a) / 15, abs=1e-12)
    assert all(r["tokens"] <= 5 for r in rows_a)


def test_refusals(grpo_run, tmp_path, capsys):
    held, reward = str(grpo_run.parent / "held.jsonl"), f"{grpo_run.parent / 'rewards.py'}:share_of_e"
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    sft = grpo_run.parent / "sft-like"
    for argv, message in [
            ([str(grpo_run), "--data", held, "--samples", "2"],
             "eval --samples 2: greedy decoding gives one completion per prompt; add --temperature"),
            ([str(grpo_run), "--data", str(pairs), "--reward", reward],
             f"eval --reward: {pairs} holds preference pairs; rewards score completions of prompts"),
            (["--base", str(sft), "--data", held, "--reward", reward], "rewards score a run's completions; give a "
             "run folder"),
            (["--base", str(sft), "--data", held, "--temperature", "1"], "eval: --samples, --temperature and --seed "
             "sample completions to score with rewards: add --reward file.py:fn, or evaluate a GRPO run")]:
        assert cli.main(["eval", *argv]) != 0
        assert message in capsys.readouterr().err


def test_a_run_is_scored_by_its_own_builtin_rewards_only_if_it_trained_on_them(tokenizer, tiny_model_dir):
    def mine(prompts: list[str], completions: list[str], answers: list) -> list[float]:
        return [0.0] * len(completions)

    user = (from_callable(mine),)
    grpo = load(None, [f"model.path={tiny_model_dir}", "train.objective=grpo", "grpo.rewards=[format,length]"])
    sft = load(None, [f"model.path={tiny_model_dir}", "grpo.rewards=[format,length]"])
    assert [r.name for r in objective_for(grpo, tokenizer, user).rewards] == ["format", "length", "mine"]
    assert [r.name for r in objective_for(sft, tokenizer, user).rewards] == ["mine"]


def test_greedy_completions_are_the_argmax_of_the_logits_whatever_the_models_generation_config(tokenizer):
    """Greedy eval draws the most likely token of the distribution GRPO samples from: a generation_config.json's
    repetition penalty, top-k, n-gram ban or minimum length does not reach it, and stays the model's own."""
    model = apply(make_model(len(tokenizer)), MethodConfig(name="lora", r=4, target_modules=["q_proj"])).eval()
    records = [PromptRecord(tokenizer(t)["input_ids"], t, None, f"line {i}") for i, t in enumerate(("hi", "a b c"))]
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    plain = greedy(model, records, 10, tokenizer.pad_token_id, stops, "cpu")
    gen = model.get_base_model().generation_config
    gen.update(repetition_penalty=5.0, top_k=2, no_repeat_ngram_size=1, min_new_tokens=10)
    set_up = gen.to_dict()
    got = greedy(model, records, 10, tokenizer.pad_token_id, stops, "cpu")
    assert torch.equal(plain["completion_ids"], got["completion_ids"]), (plain["completion_ids"], got["completion_ids"])
    assert model.get_base_model().generation_config is gen and gen.to_dict() == set_up
