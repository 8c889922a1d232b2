"""The verb registry: every verb has its arguments (commands/arguments.py) and its module (run), and
`slimtune --help` imports none of them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slimtune import cli
from slimtune.commands import arguments

ROOT = Path(__file__).resolve().parents[1]


def test_every_verb_has_its_arguments_and_a_module_with_run():
    modules = sorted(p.stem for p in (ROOT / "slimtune" / "commands").glob("*.py"))
    shared = {"__init__", "arguments", "options", "inference"}
    assert sorted(cli.COMMANDS) == sorted(set(modules) - shared)
    assert list(arguments.ADD) == list(cli.COMMANDS)  # the same verbs, in the order `slimtune --help` lists them
    for verb in cli.COMMANDS:
        module = cli.command(verb)
        assert callable(module.run) and not hasattr(module, "add"), verb  # arguments live in arguments.py only
        assert cli.arguments(verb) is arguments.ADD[verb]


def test_help_lists_the_verbs_in_order_without_importing_them():
    """Parsing imports only the chosen verb: `slimtune --help` must not wait for torch (issue 17)."""
    code = ("import json, sys\nfrom slimtune import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('slimtune.commands') or m in "
            "('torch', 'transformers', 'yaml', 'tqdm'))))")
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    usage, loaded = out.rsplit("\n", 2)[0], json.loads(out.splitlines()[-1])
    assert loaded == []
    assert "{" + ",".join(cli.COMMANDS) + "}" in usage


def test_a_chosen_verb_gets_its_arguments_and_only_it(capsys):
    with pytest.raises(SystemExit) as err:
        cli.main(["config", "--help"])
    out = capsys.readouterr().out
    assert err.value.code == 0 and "--explain" in out and "--print-config" not in out  # train's flag
    with pytest.raises(SystemExit) as err:
        cli.main(["trian"])  # a misspelt verb: argparse's choices error, no module imported for it
    assert err.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err
