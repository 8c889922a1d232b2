"""examples/prepare_extraction.py: BIO-tagged tweets to `type_text` answers (the example's gold items)."""
from __future__ import annotations

from pathlib import Path

import yaml

from conftest import load_script
from slimtune.compare import spec

ROOT = Path(__file__).resolve().parents[2]
prep = load_script(ROOT / "examples" / "prepare_extraction.py")

TEXT = "Empire\tB-facility\nState\tI-facility\nBuilding\tI-facility\n=\tO\nESB\tB-facility\nin\tO\nNew\tB-geo-loc\n" \
       "York\tI-geo-loc\nJoe\tI-person\nESB\tB-facility\n\t\nnothing\tO\nhere\tO\n"


def test_bio_spans_become_type_text_items_in_order_once():
    sents = prep.sentences(TEXT)
    assert [len(s) for s in sents] == [10, 2]
    # an I- tag of another type starts a new span; a repeated entity is listed once
    assert prep.entities(sents[0]) == ["facility_Empire State Building", "facility_ESB", "geo-loc_New York",
                                       "person_Joe"]
    assert prep.entities(sents[1]) == []


def test_the_example_config_is_a_valid_compare_plan(monkeypatch):
    monkeypatch.chdir(ROOT)
    path = ROOT / "examples" / "compare-extraction.yaml"
    comparison = spec.load(path)
    labels = [r.label for r in comparison.rows]
    assert labels == ["base", "lora", "dora", "freeze", "prompt_tuning", "p_tuning", "prefix_tuning", "ia3", "full"]
    assert comparison.metric == "extraction_f1" and comparison.cfg.train.eval_separator == "\n"
    assert yaml.safe_load(path.read_text())["data"]["eval"] == comparison.cfg.data.eval
