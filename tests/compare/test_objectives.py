"""`slimtune compare --objectives sft,dpo,orpo` on preference pairs, end to end on the tiny random Llama: every row
scored on the same held-out pairs, the table's preference accuracy and mean margin read from the runs' own scores."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import WORDS, lora_run_config, write_jsonl
from slimtune import config
from slimtune.compare import spec, table
from slimtune.runs.metrics_log import read_metrics
from test_compare import _env

OBJECTIVES = ["sft", "dpo", "orpo"]


def _pairs(tmp: Path) -> Path:
    return write_jsonl(tmp / "pairs.jsonl", [{"prompt": f"Say something about {w} ({i}).",
                                              "chosen": f"Here is {w}. {w} is nice.", "rejected": "No."}
                                             for w in WORDS for i in range(3)])


def _config(tmp: Path, model_dir: Path, section: dict | None = None, **train) -> Path:
    tmp.mkdir(exist_ok=True)
    cfg = lora_run_config(tmp, model_dir, "unused", data={"train": str(_pairs(tmp))}, method={"dropout": 0.0},
                          **{"max_steps": 3, "micro_batch_size": 4, **train})
    if section is not None:
        tree = yaml.safe_load(cfg.read_text())
        tree["compare"] = section
        cfg.write_text(yaml.safe_dump(tree, sort_keys=False))
    return cfg


@pytest.fixture(scope="module")
def by_objective(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("objectives")
    cfg, out = _config(tmp, tiny_model_dir), tmp / "out"
    cmd = [sys.executable, "-m", "slimtune", "compare", str(cfg), "preference.beta=0.5", "--objectives",
           ",".join(OBJECTIVES), "--output", str(out)]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((out / "compare.json").read_text())
    return {"out": out, "rows": {r["label"]: r for r in report["rows"]}, "report": report, "log": done.stdout}


def _last_eval(row: dict) -> dict:
    return [r for r in read_metrics(Path(row["run_dir"]) / "metrics.jsonl") if "eval_loss" in r][-1]


def _scores(row: dict) -> dict:
    return json.loads((Path(row["run_dir"]) / "compare-eval" / "scores.json").read_text())


def test_a_row_per_objective_each_scored_on_the_same_held_out_pairs(by_objective):
    rows = by_objective["rows"]
    assert list(rows) == OBJECTIVES and all(r["status"] == "done" for r in rows.values())
    assert [rows[o]["objective"] for o in OBJECTIVES] == OBJECTIVES
    for label in OBJECTIVES:
        cfg = config.load(Path(rows[label]["run_dir"]) / "config.yaml")
        assert (cfg.train.objective, cfg.preference.beta, cfg.train.max_steps) == (label, 0.5, 3)
        scores = _scores(rows[label])
        assert scores["data"] == str(by_objective["out"] / "heldout.jsonl") and scores["records"] == 4
    assert len((by_objective["out"] / "heldout.jsonl").read_text().splitlines()) == 4


@pytest.mark.parametrize("label", ["dpo", "orpo"])
def test_preference_rows_numbers_are_the_runs_own_final_eval(by_objective, label):
    row = by_objective["rows"][label]
    final = _last_eval(row)
    assert final["step"] == 3
    # the run's last in-training eval and compare's eval score the same 4 pairs with the same model
    assert row["pref_accuracy"] == pytest.approx(final["eval_rewards/accuracy"], abs=1e-6)
    assert row["pref_margin"] == pytest.approx(final["eval_rewards/margins"], abs=1e-5)
    assert row["eval_loss"] == pytest.approx(final["eval_loss"], abs=1e-5)
    scores = _scores(row)
    assert (row["pref_accuracy"], row["pref_margin"]) == (scores["rewards/accuracy"], scores["rewards/margins"])
    assert row["scored_as"] == label and row["reference"] == ("adapter_off" if label == "dpo" else "none")


def test_the_sft_row_trains_on_the_chosen_answers_and_is_scored_as_dpo(by_objective):
    out, row = by_objective["out"], by_objective["rows"]["sft"]
    cfg = config.load(Path(row["run_dir"]) / "config.yaml")
    assert (cfg.data.train, cfg.data.eval) == (str(out / "sft-train.jsonl"), str(out / "sft-heldout.jsonl"))
    first = json.loads((out / "sft-train.jsonl").read_text().splitlines()[0])["messages"]
    assert first[-1]["role"] == "assistant" and first[-1]["content"].startswith("Here is ")
    assert len((out / "sft-train.jsonl").read_text().splitlines()) == 20  # 24 pairs, 4 held out
    assert "eval_rewards/accuracy" not in _last_eval(row)  # its own evals are the answers' loss
    scores = _scores(row)
    assert (scores["objective"], scores["reference"], scores["trained_with"]) == ("dpo", "adapter_off", "sft")
    assert (row["pref_accuracy"], row["pref_margin"]) == (scores["rewards/accuracy"], scores["rewards/margins"])
    assert row["scored_as"] == "dpo"


def test_the_table_shows_accuracy_and_margin_from_the_rows(by_objective):
    out, rows = by_objective["out"], by_objective["rows"]
    lines = (out / "compare.md").read_text().splitlines()
    header = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert header[7:10] == ["Eval loss", "Preference accuracy", "Mean margin"]
    for line, label in zip(lines[4:7], OBJECTIVES):
        got = [c.strip() for c in line.split("|")[1:-1]]
        r = rows[label]
        assert got[0] == label
        assert got[7:10] == [f"{r['eval_loss']:.4f}", f"{r['pref_accuracy']:.3f}", f"{r['pref_margin']:.4f}"]
        assert got[-1].startswith(label)
    assert "sft, scored as dpo (reference: adapter_off)" in lines[4]
    assert "held-out preference pairs" in (out / "compare.md").read_text()
    assert by_objective["report"]["eval_records"] == 4
    page = (out / "compare.html").read_text()
    assert "<th>Preference accuracy</th>" in page and page.count('src="data:image/png;base64,') == 3


# --- the comparison, checked before any run (no processes) ---

def test_plan_of_objectives_and_methods(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir, {"objectives": {"sft": None, "dpo": {"preference.beta": 0.3}}})
    comparison = spec.load(cfg)
    assert comparison.pairs and comparison.metric is None
    rows = [(r.label, r.method, r.objective) for r in comparison.rows]
    assert rows == [("sft", "lora", "sft"), ("dpo", "lora", "dpo")]
    assert spec.row_overrides(comparison.rows[1]) == ["method.name=lora", "train.objective=dpo", "preference.beta=0.3"]
    one = spec.load(cfg, ["lora", "dora"], None, ["dpo"])
    assert [(r.label, r.method, r.objective) for r in one.rows] == [("lora", "lora", "dpo"), ("dora", "dora", "dpo")]
    both = spec.load(cfg, ["lora", "ia3"], None, ["sft", "orpo"])
    assert [r.label for r in both.rows] == ["lora-sft", "lora-orpo", "ia3-sft", "ia3-orpo"]
    assert [r.label for r in spec.load(cfg, ["ia3"]).rows] == ["sft", "dpo"]  # compare.objectives apply
    plain = spec.load(_config(tmp_path / "plain", tiny_model_dir, {}), ["lora"])
    assert [(r.label, r.objective) for r in plain.rows] == [("lora", None)]  # methods alone: the config's objective


@pytest.mark.parametrize("data, methods, objectives, message", [
    ("pairs", ["base", "lora"], ["dpo"], "compare.methods.base: on preference pairs every row is scored against the "
                                         "untrained model"),
    ("answers", None, ["sft", "dpo"], "compare.objectives.dpo: train.objective=dpo: compare scores preference rows "
                                      "on held-out pairs, and "),
    ("pairs", None, ["sft", "dpx"], "compare.objectives.dpx: "),
    ("pairs", None, ["dpo", "dpo"], "--objectives: a label is listed twice: dpo,dpo"),
    ("pairs", ["prompt_tuning"], ["sft"], "compare.objectives.sft: method.name=prompt_tuning: rows on preference "
                                          "pairs are scored from the decoder's hidden states"),
    ("pairs", ["full"], ["dpo"], None),
])
def test_objective_plan_errors_are_one_line(tmp_path, tiny_model_dir, data, methods, objectives, message):
    cfg = _config(tmp_path, tiny_model_dir)
    over = [f"data.train={tmp_path / 'train.jsonl'}"] if data == "answers" else []
    if message is None:  # full fine-tuning's reference: precomputed under train.reference=auto; adapter_off refused
        assert spec.load(cfg, methods, over, objectives).rows[0].objective == "dpo"
        over, message = ["train.reference=adapter_off"], ("compare.objectives.dpo: train.reference=adapter_off with "
                                                          "method.name=full: full trains the model's own weights")
    with pytest.raises(config.ConfigError) as err:
        spec.load(cfg, methods, over, objectives)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_table_without_pairs_keeps_its_score_column():
    header, body = table.cells([{"label": "lora", "method": "lora", "score": 0.5, "eval_loss": 1.0}], "f1")
    assert header[8] == "Test token F1" and body[0][8] == "0.500" and len(header) == 12
