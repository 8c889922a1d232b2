"""Command-line parsing: dotted overrides anywhere on the line, --budget sizes, warnings for method keys that
do nothing; every problem one line and exit 2."""
from __future__ import annotations

import pytest

from slimtune import cli, config
from slimtune.commands import options


@pytest.fixture
def captured(monkeypatch):
    """The config each command would run with (nothing is loaded or trained)."""
    seen = []

    def fake(args):
        seen.append(options.config_from(args))
        return 0

    for name in ("train", "params", "estimate"):
        monkeypatch.setattr(cli.command(name), "run", fake)
    return seen


@pytest.mark.parametrize("command", ["train", "params", "estimate"])
def test_overrides_after_a_flag_are_accepted(tmp_path, captured, command):
    path = tmp_path / "cfg.yaml"
    path.write_text("train:\n  max_steps: 5\n")
    flag = {"train": ["--no-progress"], "params": ["--model", "m"], "estimate": ["--budget", "24"]}[command]
    assert cli.main([command, str(path), *flag, "train.max_steps=2", "train.lr=2e-3"]) == 0
    assert (captured[0].train.max_steps, captured[0].train.lr) == (2, 2e-3)


def test_overrides_before_and_after_flags_keep_their_order(tmp_path, captured):
    path = tmp_path / "cfg.yaml"
    path.write_text("")
    assert cli.main(["train", "--no-progress", "train.lr=1e-3", str(path), "--resume", "train.lr=3e-3",
                     "method.r=4"]) == 0
    assert (captured[0].train.lr, captured[0].method.r) == (3e-3, 4)


def test_a_stray_argument_is_still_refused(tmp_path, captured, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["train", str(tmp_path / "c.yaml"), "--no-progress", "notanoverride"])
    assert err.value.code == 2
    assert "unrecognized arguments: notanoverride" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["inspect", "data.jsonl", "--json", "train.lr=1"])  # inspect takes no overrides


def test_two_config_files_are_refused(tmp_path, captured, capsys):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(""), b.write_text("")
    assert cli.main(["train", str(a), "--no-progress", str(b)]) == 2
    assert capsys.readouterr().err == (f"slimtune train: error: two config files given ({a}, {b}); give one YAML "
                                       "file, then dotted overrides such as train.lr=2e-4\n")


@pytest.mark.parametrize("budget", ["lots", "0", "1.2.3GiB"])
def test_a_bad_budget_is_one_line(budget, capsys):
    assert cli.main(["estimate", "--budget", budget]) == 2
    assert capsys.readouterr().err == (f"slimtune estimate: error: --budget {budget!r}: expected a positive size "
                                       "such as 24 (GiB), 24GiB or 1500MiB\n")


def test_a_bare_budget_is_gib(capsys, monkeypatch):
    from slimtune.engine import memory

    monkeypatch.setattr(memory, "suggestions", lambda *a, **k: [])
    cli.main(["estimate", "model.path=embedded", "--budget", "24"])
    assert "budget 24.0 GiB: predicted" in capsys.readouterr().out


def test_ia3_with_lora_targets_warns(tmp_path, captured, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("method:\n  name: lora\n  r: 16\n  target_modules: [q_proj, v_proj]\n")
    assert cli.main(["train", str(path), "method.name=ia3"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "slimtune train: warning: method.r=16 has no effect with method.name=ia3, which reads method.target_modules, "
        "method.layers_to_transform, method.modules_to_save; remove it (perhaps it was set for another method)",
        "slimtune train: warning: method.target_modules=q_proj, v_proj with method.name=ia3: IA3 scales only these, "
        "no feed-forward layer among them (LoRA-style targets, perhaps left from a LoRA config); peft's ia3 defaults "
        "(k_proj, v_proj, down_proj on Llama-style models) apply with method.target_modules=[]"]
    assert captured[0].method.target_modules == ["q_proj", "v_proj"]  # a warning, not a change


def test_no_warning_for_keys_the_method_reads(captured, capsys):
    assert cli.main(["train", "method.name=ia3", "method.target_modules=k_proj,down_proj"]) == 0
    assert cli.main(["train", "method.name=p_tuning", "method.encoder_hidden_size=64"]) == 0
    assert cli.main(["train", "method.name=dora", "method.r=4", "method.alpha=4"]) == 0
    assert capsys.readouterr().err == ""
    assert config.unused(config.load(None, ["method.name=full", "method.quant_bits=8"])) == [
        "method.quant_bits=8 has no effect with method.name=full, which reads no other method.* key; remove it "
        "(perhaps it was set for another method)"]


def test_device_cuda_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    from conftest import write_jsonl

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}])
    assert cli.main(["train", f"data.train={data}", "--no-progress", "train.device=cuda",
                     f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert capsys.readouterr().err == ("slimtune train: error: train.device=cuda (or --device cuda), but no CUDA GPU "
                                       "is visible to torch; use cpu or auto\n")


def test_seed_beyond_64_bits_is_one_line(capsys):
    assert cli.main(["train", f"train.seed={2 ** 64}", "--print-config"]) == 2
    assert capsys.readouterr().err == ("slimtune train: error: train.seed: an integer of 65 bits is beyond 64-bit "
                                       "integers; must be in [0, 2**63)\n")


@pytest.mark.parametrize("command", ["train", "estimate"])
@pytest.mark.parametrize("value", ["-3", "0", "two"])
def test_a_bad_gpu_count_is_one_line(command, value, capsys):
    with pytest.raises(SystemExit) as err:
        cli.main([command, "--gpus", value])
    assert err.value.code == 2
    assert "expected a number of GPUs (1 or more)" in capsys.readouterr().err
