"""compare's table header: the score column names the metric, or reads "Test score" with none."""
from __future__ import annotations

from slimtune.compare import table

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
