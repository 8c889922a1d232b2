"""compare's table header: the score column names the metric, or reads "Test score" with none; the legend and the
loss chart say which records the eval losses score."""
from __future__ import annotations

import json

from slimtune.compare import report, table
from slimtune.evaluate import plots

ROW = {"label": "lora", "method": "lora", "score": 0.5, "eval_loss": 1.25}


def _score_title(metric):
    header, body = table.cells([ROW], metric)
    return header[8], body[0][8]  # the column after "Eval loss"


def test_no_metric_reads_test_score_once():
    assert _score_title(None) == ("Test score", "0.500")  # was "Test test score"
    assert table.markdown([ROW], None).splitlines()[0].count("Test score") == 1
    assert "test test" not in table.markdown([ROW], None).lower()


def test_named_metric_is_in_the_header():
    assert _score_title("extraction_f1") == ("Test item-set F1", "0.500")
    assert _score_title("rougeL")[0] == "Test ROUGE-L"
    assert _score_title("accuracy")[0] == "Test accuracy"  # a metric without a display name keeps its own
    assert "| Eval loss | Test exact match | Test time |" in table.markdown([ROW], "em")


def _rows(tmp_path, during: int):
    run_dir = tmp_path / "runs" / "lora"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "eval_loss": 1.35, "eval_ppl": 3.86, "eval_tokens": during},
        {"step": 1, "loss": 1.4}, {"step": 2, "loss": 1.1},
        {"step": 2, "eval_loss": 1.0, "eval_ppl": 2.72, "eval_tokens": during}]))
    base = {"label": "base", "method": "base", "status": "done", "run_dir": str(tmp_path / "runs" / "base"),
            "eval_loss": 1.5024, "eval_records": 50, "eval_tokens": 1200}
    lora = {"label": "lora", "method": "lora", "status": "done", "run_dir": str(run_dir), "eval_loss": 1.1,
            "eval_records": 50, "eval_tokens": 1200, "train_rss_gib": 1.0, "train_seconds": 3.0}
    return [base, lora]


def test_the_loss_charts_held_out_points_say_which_records_they_score(tmp_path, monkeypatch):
    """Issue 27: the chart's before-training eval read 1.35 while the table's base row said 1.5024, with
    nothing saying the in-training eval scores a subset (the held-out records within train.eval_max_tokens)."""
    notes = []
    draw = plots.compare_losses
    monkeypatch.setattr(plots, "compare_losses", lambda runs, path, note="": notes.append(note) or draw(runs, path,
                                                                                                         note))
    meta = {"config": "c.yaml", "metric": None, "device": "cpu", "budget": "2 steps", "eval_records": 50,
            "eval_max_tokens": -1}
    report.write(tmp_path, _rows(tmp_path, during=300), meta, log=lambda *a: None)
    said = ("Loss chart: the held-out points are the in-training evals, over 300 answer tokens of the first "
            "held-out records (train.eval_max_tokens=-1: auto); the table's eval loss is over the test's 50 records "
            "(1,200 answer tokens), so the two differ (the step-0 point is not the base row's).")
    assert notes == [said]
    assert said in (tmp_path / "compare.md").read_text()
    assert json.loads((tmp_path / "compare.json").read_text())["loss_note"] == said
    assert said.replace("'", "&#x27;") in (tmp_path / "compare.html").read_text()
    same = tmp_path / "same"
    report.write(same, _rows(same, during=1200), meta, log=lambda *a: None)
    assert notes[-1] == "Loss chart: the held-out points score the same 1,200 answer tokens as the table's eval loss."
