"""GRPO through `slimtune train` on the tiny random model: sampling is reproducible, a reward raises its mean
over a short run, a killed run resumes to the very completions and losses of an uninterrupted one, and reward
code runs only when the command line names it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from slimtune import cli, fit
from slimtune.config import Config, ConfigError, MethodConfig
from slimtune.config.fields import GrpoConfig
from slimtune.data.prompts import PromptRecord, build_prompts
from slimtune.engine import grpo_sample
from slimtune.runs import checkpoint
from slimtune.runs.metrics_log import read_metrics
from slimtune.runs.ownership import MANIFEST
from slimtune.methods import apply

from conftest import make_model, write_jsonl

WORDS = ["Paris", "blue", "seven", "the fox", "water", "sleep", "a dog", "health"]
# the share of the completion's characters that are "e": the tiny model writes few at first
E_REWARD = "def share_of_e(prompts, completions, answers):\n" \
           "    return [sum(ch == 'e' for ch in c) / max(len(c), 1) for c in completions]\n"
TIMING = ("elapsed_s", "input_tokens_per_s", "trained_tokens_per_s", "step_s", "host_s", "data_s", "gc_s",
          "alloc_retries", "device_allocs", "rss_gib", "time", "gen_s", "train_s")


def _config(tmp: Path, model_dir: Path, name: str, grpo: dict | None = None, **train) -> Path:
    data = write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"Say something about {w}.", "answer": w} for w in WORDS])
    (tmp / "rewards.py").write_text(E_REWARD)
    tree = {"model": {"path": str(model_dir)}, "data": {"train": str(data), "max_len": 64},
            "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.1, "target_modules": ["q_proj", "v_proj",
                                                                                            "o_proj"]},
            "train": {"objective": "grpo", "output_dir": str(tmp / name), "lr": 3e-2, "max_steps": 12,
                      "micro_batch_size": 2, "grad_accum": 2, "batch_size": 4, "precision": "fp32", "device": "cpu",
                      "save_every": 0, "warmup_steps": 0, "scheduler": "constant", **train},
            "grpo": {"num_generations": 8, "max_new_tokens": 8, "rewards": ["contains:0.1"], **(grpo or {})}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _train(cfg: Path, *extra: str) -> int:
    return cli.main(["train", str(cfg), "--no-progress", "--reward", f"{cfg.parent / 'rewards.py'}:share_of_e",
                     *extra])


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(run / "metrics.jsonl")]


def test_sampling_with_a_fixed_seed_is_reproducible(tokenizer):
    model = apply(make_model(len(tokenizer)), MethodConfig(name="lora", r=4, target_modules=["q_proj"]))
    records = [PromptRecord(tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"],
                            "hi", None, "p line 1")]
    g = GrpoConfig(num_generations=4, max_new_tokens=12)
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def draw(seed: int) -> torch.Tensor:
        return grpo_sample.sample(model, records, g, tokenizer.pad_token_id, stops, "cpu", seed)["completion_ids"]
    torch.manual_seed(1)
    first = draw(grpo_sample.sample_seed(0, 3, 1))
    torch.manual_seed(2)  # the global RNG does not reach the samples, and sampling does not move it
    state = torch.get_rng_state()
    again = draw(grpo_sample.sample_seed(0, 3, 1))
    assert torch.equal(first, again) and torch.equal(state, torch.get_rng_state())
    assert not torch.equal(first, draw(grpo_sample.sample_seed(0, 4, 1)))  # the next generation samples anew
    assert len({tuple(row) for row in first.tolist()}) > 1  # G different completions of one prompt


def set_generation_defaults(model: torch.nn.Module) -> None:
    """Settings a generation_config.json may hold, on the transformers model inside the adapter."""
    model.get_base_model().generation_config.update(repetition_penalty=5.0, top_k=2, no_repeat_ngram_size=1,
                                                    min_new_tokens=12, suppress_tokens=[5, 6])


def test_the_models_own_generation_config_does_not_reach_the_samples(tokenizer):
    """generate fills what its config leaves unset from the model's generation_config: GRPO samples from temperature
    and top-p alone, as its log-probabilities and the static decoder assume, and leaves the model's config as it
    was, also when generate fails."""
    model = apply(make_model(len(tokenizer)), MethodConfig(name="lora", r=4, target_modules=["q_proj"]))
    records = [PromptRecord(tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")["input_ids"],
                            "hi", None, "p line 1")]
    g = GrpoConfig(num_generations=4, max_new_tokens=12, temperature=0.8, top_p=0.95)
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def draw() -> dict[str, torch.Tensor]:
        return grpo_sample.sample(model, records, g, tokenizer.pad_token_id, stops, "cpu", 11)
    plain = draw()
    set_generation_defaults(model)
    gen = model.get_base_model().generation_config
    set_up = gen.to_dict()
    got = draw()
    assert all(torch.equal(plain[k], got[k]) for k in plain), (plain["completion_ids"], got["completion_ids"])
    assert model.get_base_model().generation_config is gen and gen.to_dict() == set_up
    assert gen.repetition_penalty == 5.0 and gen.top_k == 2
    inner = model.get_base_model().model

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")
    inner.forward = fail
    with pytest.raises(RuntimeError, match="out of memory"):
        draw()
    assert model.get_base_model().generation_config is gen and gen.to_dict() == set_up


def test_a_reward_for_the_letter_e_raises_its_mean(tmp_path, tiny_model_dir):
    assert _train(_config(tmp_path, tiny_model_dir, "run", max_steps=20)) == 0
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    e = [r["rewards/share_of_e/mean"] for r in rows]
    first, last = sum(e[:3]) / 3, sum(e[-3:]) / 3
    print(f"share of 'e': first 3 steps {first:.3f}, last 3 steps {last:.3f}")
    assert first < 0.1 and last > 0.3, [round(x, 3) for x in e]
    assert {"reward", "reward_std", "frac_reward_zero_std", "rewards/contains/mean", "completion_length", "kl",
            "clip_ratio", "gen_s", "train_s"} <= rows[0].keys()
    record = json.loads((tmp_path / "run" / "rewards.json").read_text())
    assert [r["name"] for r in record] == ["contains", "share_of_e"] and len(record[1]["sha256"]) == 64


@pytest.mark.parametrize("reuse", [1, 2])
def test_a_killed_run_resumes_to_the_same_completions_and_losses(tmp_path, tiny_model_dir, reuse):
    """The uninterrupted run's numbers are kept; then its folder is cut back to what a SIGKILL after step 3's
    checkpoint leaves (later checkpoints and the final files gone, metrics.jsonl longer than the checkpoint's)
    and resumed. steps_per_generation=2: step 4 trains on step 3's completions, which only the checkpoint holds."""
    extra = {"max_steps": 6, "save_every": 1, "keep_checkpoints": 10}
    cfg = _config(tmp_path, tiny_model_dir, "run", {"steps_per_generation": reuse, "beta": 0.05}, **extra)
    assert _train(cfg) == 0
    run = tmp_path / "run"
    expected, weights = _rows(run), load_file(run / "adapter_model.safetensors")
    for path in run.iterdir():
        if path.name not in ("checkpoints", "metrics.jsonl", "config.yaml", MANIFEST, "rewards.json"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for step in (4, 5, 6):
        shutil.rmtree(checkpoint.step_folder(run, step))
    assert _train(cfg, "--resume") == 0
    assert [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    assert _rows(run) == expected  # rewards (the completions' scores), lengths, kl and losses, bit for bit
    if reuse == 2:  # the same completions trained on twice: equal rewards, and the second step's ratio moved
        assert expected[3]["reward"] == expected[2]["reward"] and expected[3]["kl"] != expected[2]["kl"]
    got = load_file(run / "adapter_model.safetensors")
    assert got.keys() == weights.keys() and all(torch.equal(got[k], weights[k]) for k in weights)


def test_resume_of_a_run_with_a_user_reward_needs_that_reward_again(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, "run", max_steps=2, save_every=1, micro_batch_size="auto",
                  grad_accum="auto", batch_size=2)
    assert _train(cfg) == 0
    assert "grpo: train.micro_batch_size=auto takes 1 prompt (8 completions) per micro-batch" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["grad_accum"] == 2
    shutil.rmtree(checkpoint.step_folder(tmp_path / "run", 2))
    assert cli.main(["train", str(cfg), "--no-progress", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "trained with the reward share_of_e from" in err and "resume with --reward" in err
    (tmp_path / "rewards.py").write_text(E_REWARD + "# changed\n")
    assert _train(cfg, "--resume") == 2
    assert "the file differs from the one this run trained with" in capsys.readouterr().err
    (tmp_path / "rewards.py").write_text(E_REWARD)
    assert _train(cfg, "--resume") == 0
    assert "resuming from" in capsys.readouterr().out
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_a_reward_named_in_the_config_is_refused_before_anything_runs(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, "run", {"rewards": [f"{tmp_path / 'rewards.py'}:share_of_e"]})
    assert cli.main(["train", str(cfg), "--no-progress"]) == 2
    assert "names Python code, which a config file never runs" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_fit_takes_reward_functions_from_the_calling_program(tmp_path, tokenizer):
    cfg = Config()
    cfg.data.train = str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"About {w}."} for w in WORDS]))
    cfg.data.max_len, cfg.method = 64, MethodConfig(name="lora", r=4, target_modules=["q_proj", "v_proj"])
    cfg.train.objective, cfg.train.max_steps, cfg.train.device, cfg.train.precision = "grpo", 2, "cpu", "fp32"
    cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.batch_size = 2, 1, 2
    cfg.grpo.num_generations, cfg.grpo.max_new_tokens, cfg.grpo.rewards = 4, 6, []
    prompts = build_prompts(cfg.data, tokenizer, needs_answer=False, log=lambda m: None).train
    model = apply(make_model(len(tokenizer)), cfg.method)
    seen = []

    def longer(prompts: list[str], completions: list[str], answers: list[str | None]) -> list[float]:
        seen.append(len(completions))
        return [float(len(c)) for c in completions]
    result = fit(model, prompts, cfg, out_dir=tmp_path / "run", rewards=[longer], tokenizer=tokenizer,
                 pad_id=tokenizer.pad_token_id, log=lambda m: None)
    assert result["steps"] == 2 and seen == [8, 8]
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and all(r["rewards/longer/mean"] > 0 for r in rows)
    assert json.loads((tmp_path / "run" / "rewards.json").read_text())[0]["source"] == "python"


PICKY = "def picky(prompts, completions, answers):\n" \
        "    if any('fox' in p for p in prompts):\n" \
        "        raise ValueError('no foxes')\n" \
        "    return [1.0] * len(completions)\n"


def test_a_failing_reward_stops_naming_the_record_or_with_skip_leaves_its_group_out(tmp_path, tiny_model_dir,
                                                                                     capsys):
    (tmp_path / "picky.py").write_text(PICKY)
    cfg = _config(tmp_path, tiny_model_dir, "run", max_steps=2)  # 2 steps of 4 prompts: each prompt once
    picky = ["--reward", f"{tmp_path / 'picky.py'}:picky"]
    assert cli.main(["train", str(cfg), "--no-progress", *picky]) == 2
    err = capsys.readouterr().err
    assert f"reward picky raised ValueError: no foxes on {tmp_path / 'prompts.jsonl'} line 4, completion '" in err
    assert cli.main(["train", str(cfg), "--no-progress", "--overwrite", *picky, "data.on_bad_record=skip"]) == 0
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert sum(r["reward_failures"] for r in rows) == 8  # the fox prompt's G completions, left out
    assert all(r["rewards/picky/mean"] == 1.0 for r in rows)  # every other group kept


def test_a_kl_reference_needs_an_adapter_to_switch_off(tokenizer):
    with pytest.raises(ConfigError, match=r"grpo.beta=0.1: the KL reference is the model with its adapter switched "
                                          "off, and LlamaForCausalLM has no adapter"):
        grpo_sample.check_reference(make_model(len(tokenizer)), GrpoConfig(beta=0.1))
    grpo_sample.check_reference(make_model(len(tokenizer)), GrpoConfig(beta=0.0))
