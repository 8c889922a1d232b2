"""The CPU's memory checked before the model loads (issue 27 item 9): a record too long for the machine is one
line naming it and a data.max_len that fits, not the allocator's message mid-step."""
from __future__ import annotations

import builtins

import pytest

from conftest import lora_run_config, write_jsonl
from slimtune import cli, config
from slimtune.data.encode import Encoded
from slimtune.engine import host_memory
from slimtune.engine.memory import GIB


def _chat(turns: int) -> dict:
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi" if i % 2 == 0 else "ok"}
                         for i in range(turns)]}


@pytest.fixture
def two_gib(monkeypatch):
    """A machine with 2 GiB available, whatever this one has: the refusal is checked without allocating."""
    monkeypatch.setattr(host_memory, "available", lambda: 2.0 * GIB)


def test_a_5000_turn_record_is_refused_before_the_model_loads(tmp_path, tiny_model_dir, two_gib, capsys, monkeypatch):
    import slimtune.models as models

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load", no_load)
    data = write_jsonl(tmp_path / "chats.jsonl", [_chat(5000)] + [_chat(2) for _ in range(11)])
    path = lora_run_config(tmp_path, tiny_model_dir, "run", data={"train": str(data), "eval_size": 0})
    assert cli.main(["train", str(path), "--no-progress", "data.max_turns=0", "data.max_len=100000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slimtune train: error: {data} line 1: this record's ")
    tokens = int(err.split("this record's ")[1].split()[0])
    assert tokens > 20000
    assert "of CPU memory in a micro-batch of 4 records (attention scores alone " in err
    assert err.endswith("they grow with the square of the length), and 2.0 GiB is available; set data.max_len=4096 "
                        "(longer records are truncated to it)\n")
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_the_longest_held_out_record_counts_too(tmp_path, tiny_model_dir, two_gib, capsys):
    """The estimate saw the training records only: a long record held out for eval went unseen."""
    train = write_jsonl(tmp_path / "train.jsonl", [_chat(2) for _ in range(8)])
    held = write_jsonl(tmp_path / "held.jsonl", [_chat(2), _chat(5000)])
    path = lora_run_config(tmp_path, tiny_model_dir, "run", data={"train": str(train), "eval": str(held)})
    assert cli.main(["train", str(path), "--no-progress", "data.max_turns=0", "data.max_len=100000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slimtune train: error: {held} line 2: this record's ")
    assert "of CPU memory in its forward pass for the held-out loss (attention scores alone" in err


def test_a_run_that_fits_is_not_stopped(tmp_path, tiny_model_dir, two_gib):
    path = lora_run_config(tmp_path, tiny_model_dir, "run", max_steps=1)
    assert cli.main(["train", str(path), "--no-progress"]) == 0


def test_the_attention_term_is_the_issues_33_8_gb():
    """SmolLM2-135M has 9 heads: one row of ~30,600 tokens in fp32 holds 9 x 30,600^2 x 4 bytes of scores."""
    assert host_memory.attention_scores(9, 1, 30_648, 4) == pytest.approx(33.8e9, rel=1e-3)


def test_need_grows_with_the_longest_record(tiny_model_dir):
    cfg = config.load(None, [f"model.path={tiny_model_dir}", "train.micro_batch_size=2", "train.batch_size=2"])
    short, _ = host_memory.need(cfg, [(100, 50), (100, 50)], 4)
    long, scores = host_memory.need(cfg, [(10_000, 50), (100, 50)], 4)
    assert scores == 2 * 4 * 10_000 ** 2 * 4  # both rows padded to the longest, fp32 on the CPU
    assert long > scores > 100 * short


def test_available_reads_meminfo_and_falls_back_to_sysconf(monkeypatch):
    first = host_memory.available()
    assert first is not None and first > 0
    real = builtins.open

    def no_proc(path, *a, **k):
        if str(path) == "/proc/meminfo":
            raise OSError("no /proc here")
        return real(path, *a, **k)

    monkeypatch.setattr(builtins, "open", no_proc)
    assert host_memory.available() > 0


def test_the_check_names_the_record(tiny_model_dir):
    cfg = config.load(None, [f"model.path={tiny_model_dir}", "train.micro_batch_size=1", "train.batch_size=1"])
    rec = Encoded(list(range(50_000)), list(range(50_000)), "data.jsonl line 7")
    with pytest.raises(host_memory.HostMemoryError) as err:
        host_memory.check(cfg, [rec], [], free=4 * GIB)
    assert str(err.value).startswith("data.jsonl line 7: this record's 50000 tokens need about ")
    host_memory.check(cfg, [rec], [], free=1e15)  # fits: nothing raised
