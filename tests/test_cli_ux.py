"""What a user sees from generate, chat and eval on a tiny trained run: atomic, truncated generation output,
Ctrl-C in chat, and run folders that never trained or stopped early named for what they are."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from conftest import write_jsonl
from scripted import reader
from slimtune import cli
from slimtune.commands import chat, inference
from slimtune.evaluate.generate import Sampling, answer_all

WORDS = ["Paris", "blue", "seven", "the fox", "healthy food", "water", "sleep", "a dog"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ux")
    rows = [{"instruction": f"Say something about {w}.", "output": f"Here is {w}. {w} is nice."} for w in WORDS]
    cfg = {"model": {"path": str(tiny_model_dir)}, "data": {"train": str(write_jsonl(tmp / "t.jsonl", rows * 2)),
                                                           "max_len": 64, "eval_size": 0},
           "method": {"name": "lora", "r": 4, "dropout": 0.0},
           "train": {"output_dir": str(tmp / "run"), "max_steps": 3, "micro_batch_size": 4, "save_every": 2,
                     "keep_checkpoints": 0}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(tmp / "cfg.yaml"), "--no-progress"]) == 0
    return tmp / "run"


def test_generate_cuts_long_prompts_and_counts_them(trained, tmp_path, capsys):
    long = "word " * 400  # ~400+ tokens, far over the run's data.max_len of 64
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": "Hi"}, {"instruction": long},
                                                 {"instruction": long + "end"}])
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", str(trained), "--input", str(prompts), "--output", str(out),
                     "--max-new-tokens", "3", "--device", "cpu", "--no-progress"]) == 0
    assert "2 prompts cut to their last 64 tokens" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 3
    assert not list(tmp_path.glob(".out.jsonl.*"))  # no temporary file left


def test_run_keeps_the_end_of_a_cut_prompt(trained, tokenizer):
    """The kept end holds the template's assistant header: the prompt cut to 20 tokens answers as the
    last 20 tokens would."""
    from slimtune.data.encode import prompt_ids
    from slimtune.data.templates import render
    from slimtune.trained import load_run

    model, tok, cfg = load_run(trained)
    conv = [{"role": "user", "content": "the quick brown fox " * 30}]
    ids = prompt_ids(render(cfg.data.template, conv, tok, add_generation_prompt=True), tok)
    g = answer_all(model, tok, cfg.data.template, [conv], Sampling(max_new_tokens=4), max_len=20)
    assert g.truncated == 1 and len(ids) > 20
    import torch

    with torch.no_grad():
        first = int(model(input_ids=torch.tensor([ids[-20:]])).logits[0, -1].argmax())
    assert g.tokens[0][0] == first
    assert answer_all(model, tok, cfg.data.template, [conv], Sampling(max_new_tokens=4)).truncated == 0  # 512 context


def test_generate_output_is_written_atomically(tmp_path):
    """A row that fails to serialize leaves the old file as it was and no temporary file."""
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    with pytest.raises(TypeError):
        inference.write_atomic(out, [{"a": 1}, {"a": 2}, {"a": {1, 2}}])  # a set is not JSON
    assert out.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    inference.write_atomic(out, [{"a": 1}])
    assert out.read_text() == '{"a": 1}\n'


def _chat(trained, lines, monkeypatch, save=None, interrupt_answer=None):
    """Run the chat loop on scripted input; a line that is an exception class is raised at the prompt."""
    from slimtune.evaluate import generate as gen_mod
    from slimtune.trained import load_run

    model, tok, cfg = load_run(trained)
    read = reader(lines)

    if interrupt_answer is not None:
        real, calls = gen_mod.answer_all, []

        def flaky(*args, **kw):
            calls.append(1)
            if len(calls) == interrupt_answer:
                raise KeyboardInterrupt
            return real(*args, **kw)
        monkeypatch.setattr(gen_mod, "answer_all", flaky)
    return chat.chat_loop(model, tok, cfg.data.template, "cpu", Sampling(max_new_tokens=3), read=read, save=save)


def test_chat_ctrl_c_at_the_prompt_exits_cleanly_and_saves(trained, tmp_path, monkeypatch, capsys):
    save = tmp_path / "chat.jsonl"
    history = _chat(trained, ["Hi", "/reset", "Say something about Paris.", KeyboardInterrupt], monkeypatch, save)
    assert [m["role"] for m in history] == ["user", "assistant"]
    err = capsys.readouterr().err
    assert f"transcript (2 answers) saved to {save}" in err and "Traceback" not in err
    rows = [json.loads(x) for x in save.read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in rows] == ["Hi", "Say something about Paris."]


def test_chat_ctrl_c_during_an_answer_goes_back_to_the_prompt(trained, monkeypatch, capsys):
    history = _chat(trained, ["first", "second", "third", EOFError], monkeypatch, interrupt_answer=2)
    assert [m["content"] for m in history if m["role"] == "user"] == ["first", "third"]
    err = capsys.readouterr().err
    assert "[stopped: this answer and its question are left out" in err
    assert "transcript not saved (--save FILE keeps it)" in err


def test_eval_on_a_run_that_never_started(trained, tmp_path, capsys):
    never = tmp_path / "never"
    never.mkdir()
    shutil.copy(trained / "config.yaml", never / "config.yaml")
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    assert cli.main(["eval", str(never), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"training never started in {never} (no metrics.jsonl, no checkpoint)" in err
    assert "run `slimtune train" in err and "did not finish saving" not in err
    assert cli.main(["chat", str(never)]) == 2
    assert "training never started" in capsys.readouterr().err


def test_eval_on_a_run_stopped_before_its_adapter_names_the_checkpoint(trained, tmp_path, capsys):
    stopped = tmp_path / "stopped"
    shutil.copytree(trained, stopped)
    (stopped / "adapter_config.json").unlink()
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello"}])
    assert cli.main(["eval", str(stopped), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert "its newest checkpoint is " + str(stopped / "checkpoints" / "step-000003") in err
    # that checkpoint is itself a folder eval takes
    assert cli.main(["eval", str(stopped / "checkpoints" / "step-000003"), "--data", str(data),
                     "--output", str(tmp_path / "e"), "--device", "cpu"]) == 0


def test_no_progress_prints_a_line_per_logged_step_and_a_summary(trained, tmp_path, capsys):
    from slimtune.runs.metrics_log import read_metrics

    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    cfg["train"].update(output_dir=str(tmp_path / "run"), log_every=2, save_every=0)
    cfg["data"].update(eval_size=2)
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert cli.main(["train", str(tmp_path / "cfg.yaml"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    steps = [x for x in out.splitlines() if x.startswith("step ")]
    assert [x.split(":")[0] for x in steps] == ["step 2/3", "step 3/3"]
    assert all("loss " in x and "input tokens/s" in x and "s elapsed" in x for x in steps)
    assert "done: 3 steps in " in out and "final train loss" in out and "eval loss" in out
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    # trained tokens are the answers only: fewer than the input tokens, per step and per second
    assert all(0 < r["trained_tokens_per_s"] < r["input_tokens_per_s"] and r["trained_tokens"] > 0 for r in rows)
    assert "tokens" not in rows[0] and "tokens_per_s" not in rows[0]


def test_eval_shows_progress_bars_on_stderr(trained, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say something about {w}.", "output": w}
                                              for w in WORDS[:5]])
    assert cli.main(["eval", str(trained), "--data", str(data), "--generate", "--max-new-tokens", "3",
                     "--output", str(tmp_path / "e"), "--device", "cpu", "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"eval loss: 100%.*5/5", err) and re.search(r"generate: 100%.*5/5.*tok_s=", err), err
    assert cli.main(["eval", str(trained), "--data", str(data), "--no-progress", "--output", str(tmp_path / "f"),
                     "--device", "cpu"]) == 0
    assert "eval loss" not in capsys.readouterr().err


def test_train_and_eval_print_no_future_warnings(tiny_model_dir, tmp_path):
    """prefix_tuning meets both library warnings slimtune filters (peft's is_gradient_checkpointing read, its
    prefix passed as past_key_values); the check sees the real stderr of the command."""
    import os
    import subprocess
    import sys

    data = write_jsonl(tmp_path / "t.jsonl", [{"instruction": f"Say something about {w}.", "output": w}
                                              for w in WORDS] * 2)
    env = dict(os.environ, PYTHONWARNINGS="default")  # every warning shown once, as a user's shell shows them
    train = ["train", f"model.path={tiny_model_dir}", f"data.train={data}", "data.eval_size=2",
             "method.name=prefix_tuning", "method.num_virtual_tokens=4", "train.max_steps=2",
             f"train.output_dir={tmp_path / 'run'}", "--no-progress"]
    ev = ["eval", str(tmp_path / "run"), "--data", str(data), "--limit", "2", "--generate", "--max-new-tokens", "2",
          "--device", "cpu"]
    # one process, two commands, as `slimtune train ... && slimtune eval ...` (one interpreter start, not two)
    script = f"import sys; from slimtune import cli; sys.exit(cli.main({train!r}) or cli.main({ev!r}))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "FutureWarning" not in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert "eval: 2 records" in done.stdout  # both commands ran
    assert "predicted peak GPU memory" not in done.stdout  # on the CPU it says what it predicts there
    assert "predicted peak memory of the run's tensors" in done.stdout
