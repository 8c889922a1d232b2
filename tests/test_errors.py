"""SlimtuneError: every error class of the package derives from it, every raise a user's input can reach
raises one, and `slimtune` prints each as one line (exit 2) with no traceback."""
from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import subprocess
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import slimtune
from conftest import write_jsonl
from slimtune import cli, errors
from slimtune.errors import (ExistingFileError, MismatchError, MissingFileError, MissingPackageError, SlimtuneError,
                             UnsupportedError)
from slimtune.runs import checks

PACKAGE = Path(slimtune.__file__).parent
# Exception classes that are not errors of the user's making, each with the reason
NOT_ERRORS = {"slimtune.compare.runner.Interrupted": "control flow: a compare asked to stop exits 130, no error"}
BUILTINS = {"ValueError", "RuntimeError", "FileNotFoundError", "FileExistsError", "ImportError", "TypeError",
            "KeyError", "OSError", "NotImplementedError", "Exception"}
# bare built-in raises left on purpose: internal invariants no input can break, each with why
INTERNAL = {("data/pack.py", "ValueError"): "the row budget is derived from data.max_len by the caller",
            ("kernels/attention.py", "ValueError"): "the packed collate builds one full causal row",
            ("engine/loop.py", "ValueError"): "fit called with held-out records and no evaluate callable",
            ("ui/paths.py", "OSError"): "raised by _stat and caught at once by Roots.check, which answers NotAPath",
            ("objectives/__init__.py", "ValueError"): "train.objective is one of the config's choices before a step",
            ("objectives/grpo.py", "ValueError"): "grpo.* values are checked with the config, and the GRPO step "
                                                  "passes whole groups and the reference when beta > 0"}


def _modules():
    for info in pkgutil.walk_packages([str(PACKAGE)], "slimtune."):
        if info.name != "slimtune.__main__":  # runs the command line on import
            yield importlib.import_module(info.name)


def test_every_error_class_is_a_slimtune_error():
    found = {}
    for mod in _modules():
        for name, obj in vars(mod).items():
            if inspect.isclass(obj) and obj.__module__ == mod.__name__ and issubclass(obj, Exception) \
                    and not issubclass(obj, Warning) and not name.startswith("_"):
                found[f"{mod.__name__}.{name}"] = obj
    assert {"slimtune.config.convert.ConfigError", "slimtune.data.checks.DataError",
            "slimtune.methods.base.MethodError", "slimtune.engine.precision.PrecisionError",
            "slimtune.export.merge.MergeError",
            "slimtune.models.UnsafeFileError"} <= set(found)  # the walk did reach them
    outside = sorted(k for k, cls in found.items() if not issubclass(cls, SlimtuneError) and k not in NOT_ERRORS)
    assert outside == []
    # the old built-in bases stay, so a caller's `except ValueError` still catches a ConfigError
    assert issubclass(slimtune.ConfigError, ValueError) and issubclass(MissingFileError, FileNotFoundError)
    assert slimtune.SlimtuneError is SlimtuneError and "SlimtuneError" in slimtune.__all__


def test_no_bare_builtin_raise_left():
    """A raise of ValueError, FileNotFoundError, ... anywhere in the package is a traceback for the user
    unless it is one of the internal invariants listed above."""
    bare = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            exc = node.exc.func if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) else None
            if isinstance(exc, ast.Name) and exc.id in BUILTINS and (rel, exc.id) not in INTERNAL:
                bare.append(f"{rel}:{node.lineno} {exc.id}")
    assert bare == []


def _one_line_error(capsys, argv: list[str], command: str) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    # the last line, and the only one that is an error (transformers' load progress bar may come before it)
    assert "Traceback" not in err and sum(": error: " in line for line in err.splitlines()) == 1, err
    last = err.splitlines()[-1]
    assert last.startswith(f"slimtune {command}: error: ")
    return last


@pytest.mark.parametrize("error", [MissingFileError, ExistingFileError, MissingPackageError, UnsupportedError,
                                   MismatchError, SlimtuneError])
def test_main_prints_every_slimtune_error_as_one_line(error, monkeypatch, capsys):
    """Also the ones only a GPU run reaches (fused_rope=on without Liger, packing with softcap)."""
    def raising(args):
        raise error("x.yaml: train.thing: what to do")

    monkeypatch.setattr(cli.command("targets"), "run", raising)
    assert _one_line_error(capsys, ["targets", "m"], "targets").endswith("error: x.yaml: train.thing: what to do")


def test_main_keeps_the_traceback_of_a_bug(monkeypatch):
    monkeypatch.setattr(cli.command("targets"), "run", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["targets", "m"])


# ---- each converted raise, through the command where the CPU reaches it, else through its function ----

def test_missing_run_folder(tmp_path, capsys):
    with pytest.raises(SlimtuneError):
        checks.check_run(tmp_path / "nope")
    err = _one_line_error(capsys, ["chat", str(tmp_path / "nope")], "chat")
    assert "no such run folder" in err


def test_missing_model_folder(tmp_path, capsys):
    err = _one_line_error(capsys, ["targets", str(tmp_path / "nope")], "targets")
    assert "model.path:" in err and "does not exist" in err
    (tmp_path / "weights.bin").write_bytes(b"")
    assert "is a file but not a .gguf file" in _one_line_error(capsys, ["targets", str(tmp_path / "weights.bin")],
                                                               "targets")
    with pytest.raises(MissingFileError):
        slimtune.models.resolve(str(tmp_path))  # a folder without config.json


def test_train_without_data_and_into_a_foreign_folder(tmp_path, tiny_model_dir, alpaca_rows, capsys):
    out = tmp_path / "run"
    err = _one_line_error(capsys, ["train", f"model.path={tiny_model_dir}", f"train.output_dir={out}"], "train")
    assert "data.train: no training data given" in err
    err = _one_line_error(capsys, ["train", f"model.path={tiny_model_dir}", f"data.train={tmp_path / 'no.jsonl'}",
                                   f"train.output_dir={out}"], "train")
    assert f"data.train: {tmp_path / 'no.jsonl'} does not exist" in err
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    data = write_jsonl(tmp_path / "d.jsonl", alpaca_rows)
    err = _one_line_error(capsys, ["train", f"model.path={tiny_model_dir}", f"data.train={data}",
                                   f"train.output_dir={out}"], "train")
    assert "already holds files that are not a slimtune run" in err
    assert (out / "notes.txt").read_text() == "mine"


def _fake_run(folder: Path, model_dir: Path) -> Path:
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({"model": {"path": str(model_dir)}}))
    return folder


def test_merge_into_a_file(tmp_path, tiny_model_dir, capsys):
    run = _fake_run(tmp_path / "run", tiny_model_dir)
    (tmp_path / "out").write_text("a file")
    err = _one_line_error(capsys, ["merge", str(run), "--output", str(tmp_path / "out")], "merge")
    assert "is a file; give a folder" in err


def test_export_of_a_folder_that_is_no_model(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = _one_line_error(capsys, ["export", str(tmp_path / "empty"), "--output", str(tmp_path / "m.gguf")], "export")
    assert "neither a run folder (config.yaml) nor a transformers model folder" in err


def test_load_without_config_or_adapter(tmp_path):
    from slimtune.runs.adapter import read_config

    with pytest.raises(MissingFileError, match="no config.yaml"):
        read_config(tmp_path)
    with pytest.raises(MissingFileError, match="neither adapter_config.json nor"):
        slimtune.load(tmp_path, torch.nn.Linear(2, 2))


def test_gguf_for_qlora_is_a_config_error(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(slimtune.ConfigError, match="cannot be loaded for qlora"):
        slimtune.models.load(str(tmp_path / "m.gguf"), quantization=object())


def test_nothing_to_train_is_a_method_error():
    from slimtune.engine.optim import build_optimizer

    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(slimtune.MethodError, match="apply a method first"):
        build_optimizer(frozen, slimtune.Config().train)


def test_saved_weights_of_another_model(tmp_path):
    from slimtune.runs import checkpoint
    from slimtune.methods import parts

    save_file({"other.weight": torch.zeros(2, 2)}, str(tmp_path / parts.PARTS))
    with pytest.raises(MismatchError, match="parameters not in the base model: other.weight"):
        parts.load(torch.nn.Linear(2, 2), tmp_path)
    with pytest.raises(MismatchError, match="its trainable parameters differ from this model's"):
        checkpoint.load(tmp_path, torch.nn.Linear(2, 2))
    save_file({"weight": torch.zeros(3, 2)}, str(tmp_path / parts.PARTS))
    with pytest.raises(MismatchError, match=r"weight has shape \(3, 2\)"):
        parts.load(torch.nn.Linear(2, 2), tmp_path)


def test_liger_kernels_on_without_liger(monkeypatch):
    from slimtune.kernels import norm_mlp, rope

    monkeypatch.setattr(norm_mlp, "available", lambda: False)
    monkeypatch.setattr(rope, "available", lambda: False)
    for module, key in ((norm_mlp, "fused_norm_mlp"), (rope, "fused_rope")):
        with pytest.raises(MissingPackageError, match=f"train.{key}=on needs Liger-Kernel"):
            module.enable(torch.nn.Linear(2, 2))


def test_packed_attention_with_softcap():
    from slimtune.kernels.attention import attention

    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(UnsupportedError, match="packed attention has no softcap.*set train.packing=off"):
        attention(types.SimpleNamespace(), q, q, q, None, softcap=30.0)


def test_failed_data_download_is_one_line(tmp_path, monkeypatch):
    from slimtune import assets

    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path))
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "WARNING: retrying\nERROR: Could not find a version that satisfies the requirement\n"))
    with pytest.raises(MissingFileError) as info:
        assets.data_file("alpaca_en_demo.json")
    assert str(info.value) == (f"could not download {assets.DATA_PIP} from PyPI (ERROR: Could not find a version "
                               "that satisfies the requirement); check the network or pip's index settings, then run "
                               "again")


def test_the_bridges_keep_their_builtin_type():
    for cls, base in ((errors.MissingFileError, FileNotFoundError), (errors.ExistingFileError, FileExistsError),
                      (errors.MissingPackageError, ImportError), (errors.UnsupportedError, NotImplementedError),
                      (errors.MismatchError, ValueError)):
        err = cls("x.yaml: what to do")
        assert isinstance(err, base) and isinstance(err, SlimtuneError) and str(err) == "x.yaml: what to do"


@pytest.mark.parametrize("command", ["chat", "merge", "export"])
def test_run_folder_with_broken_config_yaml(command, tmp_path, capsys):
    """A run's config.yaml that no longer parses was a yaml.ParserError traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {path: x\n")
    (run / "adapter_config.json").write_text("{}")
    extra = {"chat": [], "merge": ["--output", str(tmp_path / "o")], "export": ["--output", str(tmp_path / "o.gguf")]}
    assert cli.main([command, str(run), *extra[command]]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slimtune {command}: error: {run / 'config.yaml'}: invalid YAML: ")
    assert "Traceback" not in err


def test_model_folder_transformers_cannot_read(tmp_path, capsys):
    """A config.json that is not JSON, or one without model_type: transformers' OSError / ValueError was a
    traceback."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{bad")
    (tmp_path / "typeless").mkdir()
    (tmp_path / "typeless" / "config.json").write_text("{}")
    err = _one_line_error(capsys, ["targets", str(tmp_path / "broken")], "targets")
    assert f"model.path: {tmp_path / 'broken'}: transformers cannot load it (" in err and "not a valid JSON" in err
    err = _one_line_error(capsys, ["params", f"model.path={tmp_path / 'typeless'}"], "params")
    assert "transformers cannot load it (Unrecognized model in" in err and "model_type" in err


def test_compare_config_that_is_not_yaml_or_not_text(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model: [\n")
    assert "bad.yaml: invalid YAML: while parsing" in _one_line_error(capsys, ["compare", str(tmp_path / "bad.yaml")],
                                                                      "compare")
    (tmp_path / "latin.yaml").write_bytes("method: {name: caf\xe9}\n".encode("latin-1"))
    assert "latin.yaml: invalid YAML: 'utf-8' codec can't decode" in _one_line_error(
        capsys, ["compare", str(tmp_path / "latin.yaml")], "compare")


@pytest.mark.parametrize("damaged", ["adapter_config.json", "slimtune_parts.safetensors"])
def test_run_with_a_damaged_adapter(damaged, tmp_path, tiny_model_dir, capsys):
    """A save cut short: peft's JSONDecodeError and safetensors' SafetensorError were tracebacks."""
    run = _fake_run(tmp_path / "run", tiny_model_dir)
    (run / damaged).write_text("{bad")
    err = _one_line_error(capsys, ["chat", str(run)], "chat")
    assert "restore" in err and "train the run again" in err
    assert ("its adapter files cannot be read (JSONDecodeError" in err if damaged.endswith(".json")
            else "slimtune_parts.safetensors: not a readable safetensors file" in err)
