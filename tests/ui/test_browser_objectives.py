"""The objective selector and a preference run's reward charts in headless Debian chromium: choosing dpo shows its
knobs and the pairs format, the preview shows prompt, chosen and rejected, and the started run's page draws the
rewards and the preference accuracy from its metrics.jsonl."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import WORDS, write_jsonl
from test_browser import CHROMIUM, WAIT, app, browser, page, shot  # noqa: F401 - the fixtures, shared
from slimtune.runs.metrics_log import read_metrics

pytestmark = [pytest.mark.browser, pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM}")]


def _knobs(pg) -> list[str]:
    return pg.eval_on_selector_all("#objective-fields [name]", "els => els.map(e => e.name)")


def test_the_objective_selector_shows_its_knobs_and_the_run_draws_its_rewards(app, page, tmp_path):  # noqa: F811
    url, work = app
    write_jsonl(work / "pairs.jsonl", [{"prompt": f"Say something about {w} ({i}).", "chosen": f"Here is {w}.",
                                        "rejected": "No."} for w in WORDS for i in range(3)])
    page.goto(url + "/#setup")
    page.wait_for_selector('[name="method.r"]')
    assert _knobs(page) == [] and "answers" in page.inner_text("#data-hint")
    page.select_option('[name="train.objective"]', "orpo")
    assert _knobs(page) == ["preference.orpo_lambda"]
    page.select_option('[name="train.objective"]', "dpo")
    assert _knobs(page) == ["train.reference", "preference.beta", "preference.label_smoothing"]
    assert '"chosen", "rejected"' in page.inner_text("#data-hint")
    for name, value in [("model.path", "tiny"), ("data.train", "pairs.jsonl"), ("data.max_len", "64"),
                        ("method.r", "4"), ("method.target_modules", "q_proj,v_proj"), ("train.max_steps", "4"),
                        ("train.save_every", "0"), ("train.lr", "0.01"), ("train.output_dir", "runs/dpo"),
                        ("preference.beta", "0.5")]:
        page.fill(f'[name="{name}"]', value)
    page.select_option('[name="train.device"]', "cpu")
    page.select_option('[name="train.precision"]', "fp32")
    page.wait_for_function("document.querySelector('#preview-counts')?.textContent.includes('24 pairs')",
                           timeout=WAIT)
    assert page.locator(".record .seg.chosen").count() == 3 and page.locator(".record .seg.rejected").count() == 3
    assert "beta: 0.5" in page.inner_text("#yaml") and "objective: dpo" in page.inner_text("#yaml")
    shot(page, tmp_path, "setup-dpo")
    page.click("#start-run")
    page.wait_for_selector('#run-status[data-status="done"]', timeout=WAIT)
    rows = read_metrics(work / "runs" / "dpo" / "metrics.jsonl")
    train = [r for r in rows if "rewards/margins" in r]
    held = [r for r in rows if "eval_rewards/margins" in r]
    assert train and held
    # margins, chosen and rejected of every logged step and eval; accuracy of each
    want = 3 * (len(train) + len(held))
    page.wait_for_function(f"document.querySelector('#chart-rewards').dataset.points == '{want}'", timeout=WAIT)
    assert page.get_attribute("#chart-accuracy", "data-points") == str(len(train) + len(held))
    assert page.is_visible("#chart-rewards canvas") and page.is_visible("#chart-accuracy canvas")
    legend = page.inner_text("#chart-rewards .u-legend")
    for series in ("margins", "chosen", "rejected", "eval margins"):
        assert series in legend, legend
    assert "eval accuracy" in page.inner_text("#chart-accuracy .u-legend")
    shot(page, tmp_path, "train-dpo")
