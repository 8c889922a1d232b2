"""Every finished `slimtune train` run leaves summary.json and loss.png; drawing never fails a run."""
from __future__ import annotations

import json
import sys

import pytest

from conftest import lora_run_config, make_model
from slimtune import cli, config
from slimtune.evaluate import plots, summary
from slimtune.methods import apply, count_parameters


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_train_writes_loss_png_and_summary(tmp_path, tiny_model_dir, tokenizer):
    cfg_path = lora_run_config(tmp_path, tiny_model_dir, "run", max_steps=4, eval_every=2)
    assert cli.main(["train", str(cfg_path), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert png_size(run / "loss.png") == plots.SIZE
    s = json.loads((run / "summary.json").read_text())
    cfg = config.load(cfg_path)
    assert (s["trainable_params"], s["total_params"]) == count_parameters(apply(make_model(len(tokenizer)), cfg.method))
    assert s["steps"] == 4 and s["train_seconds"] > 0 and s["eval_after"]["eval_loss"] > 0


def test_curves_read_train_and_eval_points_of_metrics_rows():
    rows = [{"step": 0, "eval_loss": 3.0}, {"step": 1, "loss": 2.5}, {"step": 2, "loss": 2.0},
            {"step": 2, "eval_loss": 2.2}, {"loss": 9.0}]  # a row without a step is not a point
    assert plots.curves(rows) == ([(1, 2.5), (2, 2.0)], [(0, 3.0), (2, 2.2)])


def test_a_drawing_failure_is_reported_and_never_raised(tmp_path, tokenizer, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    said = []
    summary.write(tmp_path, {"steps": 1}, make_model(len(tokenizer)), said.append)
    assert not (tmp_path / "loss.png").exists()
    assert len(said) == 1 and said[0].startswith(f"warning: could not draw {tmp_path / 'loss.png'}: ModuleNotFound")
    assert said[0].endswith("(pip install matplotlib)")
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 1  # the summary still stands


def test_an_unwritable_summary_is_reported(tmp_path, tokenizer):
    said = []
    summary.write(tmp_path / "gone", {"steps": 1}, make_model(len(tokenizer)), said.append)
    assert any(x.startswith("warning: could not write") for x in said) and any("could not draw" in x for x in said)


@pytest.mark.parametrize("rows", [[], [{"step": 1, "loss": 2.0}]])
def test_loss_png_of_few_or_no_points_is_still_an_image(tmp_path, rows):
    assert png_size(plots.loss_png(rows, tmp_path / "x.png")) == plots.SIZE
