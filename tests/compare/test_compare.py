"""`slimtune compare` end to end on the tiny random Llama: three methods (one that cannot run), killed after
the first and run again; the rows, the charts, the report page in a real headless browser."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import lora_run_config
from slimtune import config
from slimtune.compare import spec
from slimtune.evaluate import plots
from slimtune.methods import apply, count_on_meta, count_parameters

METHODS = ["lora", "ia3", "bitfit"]  # bitfit: the tiny Llama has no biases, so its row fails


def _cmd(cfg: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "slimtune", "compare", str(cfg), "--output", str(out)]


def _env() -> dict:
    root = str(Path(__file__).resolve().parents[2])  # children import this checkout's slimtune
    return dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_model_dir):
    """A compare SIGTERMed once its first row is done, then run again to the end."""
    tmp = tmp_path_factory.mktemp("compare")
    cfg = lora_run_config(tmp, tiny_model_dir, "unused", max_steps=3, eval_max_records=3, eval_max_new_tokens=8,
                          eval_separator="\n", eval_every=1)
    tree = yaml.safe_load(cfg.read_text())
    tree["compare"] = {"methods": {"lora": None, "ia3": {"train.lr": 2e-2}, "bitfit": None}}
    cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    out = tmp / "out"
    first = subprocess.Popen(_cmd(cfg, out), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (out / "results" / "lora.json").is_file() and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    first.send_signal(signal.SIGTERM)
    first_log = first.communicate(timeout=300)[0]
    marks = {p.name: p.stat().st_mtime_ns for p in [out / "results" / "lora.json", out / "logs" / "lora.train.log"]}
    second = subprocess.run(_cmd(cfg, out), env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    report = json.loads((out / "compare.json").read_text())
    return {"out": out, "cfg": cfg, "first": (first.returncode, first_log), "second": second, "marks": marks,
            "rows": {r["label"]: r for r in report["rows"]}, "report": report}


def test_interrupted_compare_resumes_and_skips_the_finished_method(compared):
    rc, log = compared["first"]
    out = compared["out"]
    assert rc == 130, log  # stopped by the SIGTERM, with the message saying how to go on
    assert "run the same command again to go on" in log
    assert "compare: lora: finished earlier (done), skipped" in compared["second"].stdout
    assert "compare: lora: training" not in compared["second"].stdout
    for path in (out / "results" / "lora.json", out / "logs" / "lora.train.log"):  # untouched by the second run
        assert path.stat().st_mtime_ns == compared["marks"][path.name]
    assert list(compared["rows"]) == METHODS


def _own_count(cfg_path: Path, label: str, model_dir: Path) -> tuple[int, int]:
    """The method's own count on a real (not meta) model, as `slimtune train` logs it."""
    from transformers import AutoModelForCausalLM

    cfg = config.load(cfg_path, [f"method.name={label}"])
    return count_parameters(apply(AutoModelForCausalLM.from_pretrained(model_dir), cfg.method))


@pytest.mark.parametrize("label", ["lora", "ia3"])
def test_rows_of_methods_that_ran_are_complete(compared, label, tiny_model_dir):
    row = compared["rows"][label]
    assert row["status"] == "done" and row["reason"] is None
    trainable, total = _own_count(compared["out"] / "config.yaml", label, tiny_model_dir)
    assert (row["trainable_params"], row["total_params"]) == (trainable, total)
    cfg = config.load(compared["out"] / "config.yaml", [f"method.name={label}"])
    assert count_on_meta(str(tiny_model_dir), cfg.method) == (trainable, total)
    assert 0 < trainable < total and row["trainable_share"] == pytest.approx(trainable / total)
    for key in ("train_seconds", "train_wall_seconds", "eval_seconds", "eval_wall_seconds", "tokens_per_s"):
        assert row[key] > 0, key
    for key in ("train_rss_gib", "infer_rss_gib"):
        assert 0.05 < row[key] < 64, key  # a Python process with torch holds at least ~100 MiB
    assert 0.0 <= row["score"] <= 1.0 and row["metric"] == "extraction_f1"
    assert math.isfinite(row["eval_loss"]) and row["eval_records"] == 3
    assert row["steps"] == 3 and row["artifact_bytes"] > 0


def test_per_method_overrides_reach_the_run(compared):
    ia3 = config.load(Path(compared["rows"]["ia3"]["run_dir"]) / "config.yaml")
    lora = config.load(Path(compared["rows"]["lora"]["run_dir"]) / "config.yaml")
    assert (ia3.method.name, ia3.train.lr, lora.train.lr) == ("ia3", 2e-2, 1e-2)
    assert ia3.train.seed == lora.train.seed and ia3.data == lora.data  # same data, split and seed


def test_a_method_that_cannot_run_has_its_reason(compared):
    row = compared["rows"]["bitfit"]
    assert row["status"] == "failed"
    assert row["reason"].startswith("slimtune train: error: method bitfit trains bias terms")
    assert row.get("score") is None and row.get("trainable_params") is None
    assert "failed: slimtune train: error: method bitfit" in (compared["out"] / "compare.md").read_text()


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (the header must be a PNG's)."""
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def test_charts_and_every_runs_loss_png_are_images_of_the_chart_size(compared):
    out = compared["out"]
    paths = [out / n for n in ("loss_curves.png", "score_vs_memory.png", "score_vs_time.png")]
    paths += [out / "runs" / m / "loss.png" for m in ("lora", "ia3")]
    for path in paths:
        assert png_size(path) == plots.SIZE, path


def test_markdown_table_has_the_tutorial_columns_and_a_row_per_method(compared):
    text = (compared["out"] / "compare.md").read_text()
    header = text.splitlines()[2]
    for col in ("Method", "Training memory", "Trainable params", "Total params", "Trainable share",
                "Inference memory", "Training time", "Eval loss", "Test item-set F1", "Test time", "Size"):
        assert col in header, col
    assert [line.split("|")[1].strip() for line in text.splitlines()[4:7]] == METHODS


def test_html_page_is_self_contained(compared):
    page = (compared["out"] / "compare.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3
    assert "<table>" in page and page.count("<tr") == 1 + len(METHODS)
    assert "http://" not in page and "https://" not in page and 'src="' + "file" not in page


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium(compared, tmp_path):
    from PIL import Image

    shot = tmp_path / "page.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1200,2000", (compared["out"] / "compare.html").resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    assert png_size(shot) == (1200, 2000)
    img = Image.open(shot).convert("L")

    def band(top: int, bottom: int) -> int:  # dark pixels (text, lines) in a horizontal band
        return sum(img.crop((0, top, 1200, bottom)).histogram()[:200])

    assert band(0, 300) > 2000  # the title and the table are drawn (dark pixels near the top)
    assert band(400, 2000) > 5000  # the charts below it (axes, lines, labels; a page without them: ~0)


# --- the compare section, checked before any run (no processes) ---

def _write(tmp_path: Path, model_dir: Path, section) -> Path:
    cfg = lora_run_config(tmp_path, model_dir, "x", max_steps=2)
    tree = yaml.safe_load(cfg.read_text())
    tree["compare"] = section
    cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    return cfg


def test_plan_rows_overrides_and_labels(tmp_path, tiny_model_dir):
    cfg = _write(tmp_path, tiny_model_dir, {"methods": {"base": None, "lora": None,
                                                       "prompt_tuning": {"train.lr": 0.03},
                                                       "lora_r8": {"method.name": "lora", "method.r": 8,
                                                                   "method.target_modules": ["q_proj"]}}})
    comparison = spec.load(cfg)
    assert [(r.label, r.method) for r in comparison.rows] == [("base", "base"), ("lora", "lora"),
                                                        ("prompt_tuning", "prompt_tuning"), ("lora_r8", "lora")]
    assert spec.row_overrides(comparison.rows[3]) == ["method.name=lora", "method.r=8",
                                                      "method.target_modules=[q_proj]"]
    assert comparison.metric is None and comparison.cfg.train.max_steps == 2
    picked = spec.load(cfg, ["full", "prompt_tuning"], ["train.max_steps=5"])
    assert [(r.label, r.overrides) for r in picked.rows] == [("full", []), ("prompt_tuning", ["train.lr=0.03"])]
    assert picked.cfg.train.max_steps == 5


@pytest.mark.parametrize("section, methods, message", [
    ({"methods": ["lora", "lorra"]}, None, "compare.methods.lorra: 'lorra' is no method (known: base, lora"),
    ({"methods": {"lora": {"train.lrr": 1}}}, None,
     "compare.methods.lora: override train.lrr: unknown key (did you mean train.lr?)"),
    ({"methods": {"freeze": {"method.trainable_layers": "two"}}}, None,
     "compare.methods.freeze: override method.trainable_layers: expected an integer, got 'two'"),
    ({"methods": {"base": {"train.lr": 1}}}, None, "compare.methods.base: the untrained model takes no overrides"),
    ({"methods": ["lora"], "metric": "accuracy"}, None, "compare.metric: 'accuracy' is not one of extraction_f1"),
    ({"methods": ["lora"], "metric": "extraction_f1"}, None, "extraction_f1 splits answers on train.eval_separator"),
    ({"methods": ["lora"], "metrics": "f1"}, None, "compare: unknown key metrics (known: methods, objectives, metric)"),
    ({}, None, "no methods to compare: pass --methods"),
    ({}, ["lora", "lora"], "--methods: a label is listed twice"),
    ({"methods": {"a/b": None}}, None, "compare.methods.a/b: a label names folders"),
])
def test_plan_errors_are_one_line_naming_the_key(tmp_path, tiny_model_dir, section, methods, message):
    cfg = _write(tmp_path, tiny_model_dir, section)
    with pytest.raises(config.ConfigError) as err:
        spec.load(cfg, methods)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_compare_needs_held_out_records(tmp_path, tiny_model_dir):
    cfg = _write(tmp_path, tiny_model_dir, {"methods": ["lora"]})
    with pytest.raises(config.ConfigError, match="compare scores every method on held-out records"):
        spec.load(cfg, None, ["data.eval_size=0"])


def test_cli_reports_plan_errors_as_one_line(tmp_path, tiny_model_dir, capsys):
    from slimtune import cli

    cfg = _write(tmp_path, tiny_model_dir, {"methods": ["lora"]})
    assert cli.main(["compare", str(cfg), "--methods", "lora,nope", "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimtune compare: error: ") and "compare.methods.nope" in err and "\n" not in err
    assert not (tmp_path / "o").exists()  # nothing starts before the comparison is valid


def test_a_row_goes_on_from_its_checkpoint_unless_its_overrides_changed(compared, tmp_path):
    from slimtune.compare.runner import _train_args

    out = compared["out"]
    shared, run_dir = out / "config.yaml", out / "runs" / "lora"
    assert _train_args(spec.Row("lora", "lora", []), shared, run_dir)[-1] == "--resume"
    assert _train_args(spec.Row("lora", "lora", ["train.lr=0.5"]), shared, run_dir)[-1] == "--overwrite"
    assert _train_args(spec.Row("lora", "lora", []), shared, tmp_path / "new")[-1] == "--no-progress"


def test_a_trained_row_is_not_trained_again_unless_its_config_changed(compared, monkeypatch):
    """A compare stopped during a row's eval reuses that row's training; changed overrides train anew."""
    from slimtune.compare import runner

    out = compared["out"]
    started = []
    monkeypatch.setattr(runner.child, "run_measured", lambda args, *a: started.append(args) or pytest.fail("trained"))
    same = runner._train(spec.Row("lora", "lora", []), out / "config.yaml", out, None, print)
    assert same["reason"] is None and started == []
    monkeypatch.setattr(runner.child, "run_measured", lambda args, *a: started.append(args) or (_ for _ in ()).throw(
        KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        runner._train(spec.Row("lora", "lora", ["train.lr=0.5"]), out / "config.yaml", out, None, print)
    assert started and started[0][-1] == "--overwrite"


def test_each_childs_peak_memory_is_its_own(tmp_path, tiny_model_dir, monkeypatch):
    """A small child run after a large one reports its own peak: not the larger one's (as
    getrusage(RUSAGE_CHILDREN) would, the maximum over every child waited for), nor this parent's RSS
    at fork time (as os.wait4's ru_maxrss does on Linux: 0.35 GiB here for both children)."""
    from slimtune.compare import child

    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    with child.Forward() as fwd:
        big = child.run_measured(["targets", str(tiny_model_dir)], tmp_path / "big.log", tmp_path / "big.json", fwd)
        small = child.run_measured(["--help"], tmp_path / "small.log", tmp_path / "small.json", fwd)
    assert (big.rc, small.rc) == (0, 0) and "q_proj" in (tmp_path / "big.log").read_text()
    parent = int(next(x for x in Path("/proc/self/status").read_text().splitlines()
                      if x.startswith("VmRSS:")).split()[1]) / 2**20
    # measured: --help 0.22 GiB (cli imports torch), targets 0.34 GiB (+ transformers), pytest ~0.35+ GiB
    assert small.rss_gib < big.rss_gib and small.rss_gib < 0.8 * parent, (small.rss_gib, big.rss_gib, parent)
    assert small.gpu == {} and small.seconds > 0 and not small.interrupted


def test_data_no_row_can_train_on_stops_before_any_row_with_trains_message(tmp_path, tiny_model_dir, capsys):
    """Issue 27: with no answer token within data.max_len, compare ran the base row (98 s), then started
    every training row only for each to fail on the same error. Now it stops first, as train does."""
    from slimtune import cli

    short = ["data.max_len=8"]  # the prompt alone is ~20 tokens: every answer is cut off
    plain = lora_run_config(tmp_path, tiny_model_dir, "x", max_steps=2)
    assert cli.main(["train", str(plain), *short, "--no-progress"]) == 2
    trains = capsys.readouterr().err.strip().splitlines()[-1]
    assert trains.startswith("slimtune train: error: ") and "no training record has an answer token" in trains
    cfg = _write(tmp_path, tiny_model_dir, {"methods": ["base", "lora", "ia3"]})
    started = time.perf_counter()
    assert cli.main(["compare", str(cfg), *short, "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == trains.replace("slimtune train:", "slimtune compare:")
    assert not (tmp_path / "o").exists() and time.perf_counter() - started < 30  # no row ran
    # a row's own data.* overrides are checked too, and named
    tree = yaml.safe_load(cfg.read_text())
    tree["compare"] = {"methods": {"base": None, "lora": None, "ia3": {"data.max_len": 8}}}
    cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    assert cli.main(["compare", str(cfg), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("slimtune compare: error: compare.methods.ia3: ") and err.endswith(trains.split(
        "error: ", 1)[1]) and not (tmp_path / "o").exists()
