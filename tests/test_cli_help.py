"""`slimtune <verb> --help` and usage errors answer without importing torch, transformers, peft or numpy: the
arguments are in commands/arguments.py and a verb's module (which loads them, 6-7 s) is imported only when it
runs. Each case runs `python -m slimtune` in a fresh interpreter and reads back which modules it loaded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimtune import cli

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "peft", "numpy")
# runs `python -m slimtune ARGS` (after importing PRELOAD, if named), then reports on stderr's last line
DRIVER = """
import json, runpy, sys
preload, sys.argv = sys.argv[1], ["slimtune", *sys.argv[2:]]
if preload:
    __import__(preload)
code = None
try:
    runpy.run_module("slimtune", run_name="__main__", alter_sys=True)
except SystemExit as err:
    code = err.code
loaded = sorted(sys.modules)
print(json.dumps({"code": code, "heavy": sorted({m.split(".")[0] for m in loaded} & set(%r)),
                  "commands": [m for m in loaded if m.startswith("slimtune.commands")]}), file=sys.stderr)
""" % (HEAVY,)

# verb: options its --help must name (its main ones; a verb whose arguments went missing fails here)
MAIN_OPTIONS = {
    "train": ["config", "overrides", "--print-config", "--help-config", "--overwrite", "--resume", "--gpus"],
    "inspect": ["data", "--model", "--template", "--json", "--max-len"],
    "chat": ["folder", "--max-new-tokens", "--sample", "--system", "--save"],
    "generate": ["folder", "--input", "--output", "--batch-size", "--temperature"],
    "targets": ["model", "--trust-remote-code"],
    "params": ["config", "overrides", "--model"],
    "estimate": ["config", "--budget", "--gpus"],
    "merge": ["folder", "--output", "--dtype", "--overwrite"],
    "export": ["folder", "--format", "--output", "--quant", "--imatrix"],
    "eval": ["folder", "--data", "--base", "--generate", "--extraction", "--limit"],
    "compare": ["config", "--methods", "--output"],
    "config": ["config", "--model", "--explain"],
    "demo": ["--output-dir", "--steps"],
    "ui": ["--port", "--host", "--allow-remote", "--runs"],
}


def _slimtune(*args: str, preload: str = "") -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    done = subprocess.run([sys.executable, "-c", DRIVER, preload, *args], capture_output=True, text=True, env=env,
                          timeout=120)
    return done, json.loads(done.stderr.splitlines()[-1])


def test_every_verb_is_checked():
    assert list(MAIN_OPTIONS) == list(cli.COMMANDS)


@pytest.mark.parametrize("verb", list(cli.COMMANDS))
def test_verb_help_imports_no_heavy_library(verb):
    done, seen = _slimtune(verb, "--help")
    assert (seen["code"], seen["heavy"]) == (0, [])
    # the arguments only: the module that runs the verb stays unimported
    assert seen["commands"] == ["slimtune.commands", "slimtune.commands.arguments"]
    assert done.stdout.startswith(f"usage: slimtune {verb} [-h]")
    missing = [opt for opt in MAIN_OPTIONS[verb] if opt not in done.stdout]
    assert missing == [], f"slimtune {verb} --help lacks {missing}"


@pytest.mark.parametrize("argv, message", [
    (["train", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    (["train", "--gpus", "0"], "argument --gpus: expected a number of GPUs (1 or more), got '0'"),
    (["merge", "run"], "the following arguments are required: --output"),
    (["eval", "run", "--data", "d.jsonl", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["inspect", "d.jsonl", "--template", "nope"], "argument --template: invalid choice: 'nope'"),
])
def test_usage_errors_import_no_heavy_library(argv, message):
    done, seen = _slimtune(*argv)
    assert (seen["code"], seen["heavy"]) == (2, [])
    assert seen["commands"] == ["slimtune.commands", "slimtune.commands.arguments"]
    assert message in done.stderr


def test_the_driver_sees_a_heavy_import():
    """The checks above would pass on a driver that saw nothing: here numpy is imported before the help."""
    done, seen = _slimtune("demo", "--help", preload="numpy")
    assert (seen["code"], seen["heavy"]) == (0, ["numpy"])
    assert "--output-dir" in done.stdout


def test_running_a_verb_imports_its_module():
    """The other half: the verb's module loads once it runs (`config --explain` is one that loads no torch)."""
    done, seen = _slimtune("config", "--explain")
    assert seen["code"] == 0 and "slimtune.commands.config" in seen["commands"]
    assert "train.lr" in done.stdout


def test_the_command_line_runs_offline_unless_told_otherwise(monkeypatch):
    """main sets HF_HUB_OFFLINE=1 before any verb imports a Hugging Face library (bitsandbytes' import would
    otherwise try to fetch a CPU kernel from the hub), and leaves a value the user set."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert os.environ["HF_HUB_OFFLINE"] == "0"
