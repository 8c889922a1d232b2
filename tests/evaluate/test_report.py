"""`slimtune eval` on a tiny trained run and on its base model: the same loss as training measured,
scores.json and predictions.jsonl, and item-set scoring for extraction answers."""
from __future__ import annotations

import json

import pytest
import yaml

from conftest import write_jsonl
from slimtune import cli
from slimtune.evaluate import report
from slimtune.evaluate.generate import Generated

WORDS = ["Paris", "blue", "seven", "the fox", "healthy food", "water", "sleep", "a dog"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("eval")
    rows = [{"instruction": f"Say something about {w}.", "output": f"Here is {w}. {w} is nice."} for w in WORDS]
    train = write_jsonl(tmp / "train.jsonl", rows * 3)
    held = write_jsonl(tmp / "held.jsonl", rows[:3] + [
        {"messages": [{"role": "user", "content": "Say something about blue."},
                      {"role": "assistant", "content": "Here is blue. blue is nice."},
                      {"role": "user", "content": "And water?"},
                      {"role": "assistant", "content": "Here is water. water is nice."}]}])
    cfg = {"model": {"path": str(tiny_model_dir)}, "data": {"train": str(train), "eval": str(held), "max_len": 64},
           "method": {"name": "lora", "r": 4, "dropout": 0.0},
           "train": {"output_dir": str(tmp / "run"), "max_steps": 8, "micro_batch_size": 4, "lr": 1e-2,
                     "warmup_steps": 0, "scheduler": "constant"}}
    (tmp / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(tmp / "cfg.yaml"), "--no-progress"]) == 0
    return tmp / "run", held


def _eval_rows(run):
    from slimtune.runs.metrics_log import read_metrics

    return [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]


def test_eval_command_gives_the_loss_training_measured(trained, tmp_path, capsys):
    run, held = trained
    assert cli.main(["eval", str(run), "--data", str(held), "--output", str(tmp_path / "after"),
                     "--device", "cpu"]) == 0
    after = json.loads((tmp_path / "after" / "scores.json").read_text())
    assert after["eval_loss"] == pytest.approx(_eval_rows(run)[-1]["eval_loss"], rel=1e-5)
    assert after["records"] == 4 and after["eval_tokens"] > 0 and "em" not in after
    assert not (tmp_path / "after" / "predictions.jsonl").exists()  # no generation asked
    assert "perplexity" in capsys.readouterr().out
    # the base model, no adapter, same template: the loss training measured before its first step
    assert cli.main(["eval", "--base", _base(run), "--template", "auto", "--max-len", "64", "--data", str(held),
                     "--output", str(tmp_path / "before"), "--device", "cpu"]) == 0
    before = json.loads((tmp_path / "before" / "scores.json").read_text())
    assert before["eval_loss"] == pytest.approx(_eval_rows(run)[0]["eval_loss"], rel=1e-5)
    assert before["eval_loss"] > after["eval_loss"]


def _base(run) -> str:
    return yaml.safe_load((run / "config.yaml").read_text())["model"]["path"]


def test_eval_generate_writes_scores_and_predictions(trained, tmp_path):
    run, held = trained
    out = tmp_path / "gen"
    assert cli.main(["eval", str(run), "--data", str(held), "--generate", "--extraction", "--separator", ".",
                     "--max-new-tokens", "12", "--output", str(out), "--device", "cpu"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    for key in ("eval_loss", "eval_ppl", "em", "f1", "bleu4", "rouge1", "rouge2", "rougeL", "extraction_precision",
                "extraction_recall", "extraction_f1", "tokens_per_s"):
        assert key in scores, key
    assert scores["separator"] == "." and scores["max_new_tokens"] == 12
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[3]["prompt"] == "And water?" and rows[3]["reference"].startswith("Here is water")
    keys = {"where", "prediction", "em", "f1", "bleu4", "rougeL", "extraction_f1", "stopped"}
    assert all(keys <= set(r) for r in rows)
    assert scores["em"] == pytest.approx(100 * sum(r["em"] for r in rows) / 4, abs=1e-3)


def test_eval_refuses_a_run_and_a_base_together(trained, capsys):
    run, held = trained
    assert cli.main(["eval", str(run), "--base", "x", "--data", str(held)]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(["eval", "--data", str(held)]) == 2
    assert "--base" in capsys.readouterr().err


def test_evaluate_run_with_encoded_records_and_fixed_answers(trained, monkeypatch):
    """The training-loop hook passes its encoded held-out records; answers are scored as item sets."""
    from slimtune.data import encode_examples, read
    from slimtune.trained import load_run

    run, held = trained
    model, tok, cfg = load_run(run)
    examples = read(held)
    records, _ = encode_examples(examples, tok, cfg.data)
    a = report.evaluate_run(model, tok, cfg, examples).scores
    b = report.evaluate_run(model, tok, cfg, examples, records=records).scores
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-6) and a["eval_tokens"] == b["eval_tokens"]

    answers = ["Here is Paris. Paris is nice.", "Here is blue", "", "Here is water. Here is water. x"]
    monkeypatch.setattr(report, "run_generation", lambda *args, **kw: Generated(
        answers, [[1, 2]] * 4, [True, True, False, True], 1.0))
    r = report.evaluate_run(model, tok, cfg, examples, extraction_sep=".")
    # items per answer (split on "."): gold {Here is X, X is nice} each; predicted {Here is Paris, Paris is nice},
    # {Here is blue}, {}, {Here is water, x}: tp 2 + 1 + 0 + 1 = 4, predicted 2 + 1 + 0 + 2 = 5, gold 8
    assert r.scores["extraction_precision"] == pytest.approx(80.0)
    assert r.scores["extraction_recall"] == pytest.approx(50.0)
    assert r.scores["em"] == pytest.approx(25.0) and r.scores["unfinished"] == 1
    assert [row["extraction_f1"] for row in r.predictions] == pytest.approx([1.0, 2 / 3, 0.0, 0.5])
    assert "extraction (items split on '.')" in r.summary()


def test_scores_json_is_strict_json_with_null_and_a_reason(tmp_path):
    """A bare NaN is not JSON (issue 15 item 7): non-finite scores are null, with the reason beside them."""
    import json

    from slimtune.evaluate.report import Report

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    nan = float("nan")
    Report({"eval_loss": nan, "eval_ppl": float("inf"), "eval_tokens": 12, "records": 3}).write(tmp_path / "a")
    scores = json.loads((tmp_path / "a" / "scores.json").read_text(), parse_constant=refuse)
    assert scores["eval_loss"] is None and scores["eval_ppl"] is None and scores["eval_tokens"] == 12
    assert scores["null_reasons"]["eval_loss"].startswith("nan: the model's loss over the answer tokens is not finite")
    assert scores["null_reasons"]["eval_ppl"].startswith("inf: ")
    Report({"eval_loss": nan, "eval_tokens": 0}, [{"where": "x", "f1": nan}]).write(tmp_path / "b")
    scores = json.loads((tmp_path / "b" / "scores.json").read_text(), parse_constant=refuse)
    assert scores["null_reasons"] == {"eval_loss": "nan: no record kept an answer token within max_len, so there "
                                                   "is nothing to score"}
    row = json.loads((tmp_path / "b" / "predictions.jsonl").read_text(), parse_constant=refuse)
    assert row == {"where": "x", "f1": None, "null_reasons": {"f1": "nan (not a finite number)"}}
