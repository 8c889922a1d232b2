"""`slimtune ui` end to end in headless Debian chromium (Playwright drives /usr/bin/chromium; no browser is
downloaded): set up a run on the tiny model, see the estimate and the data preview, start it, watch the loss chart
gain points, reload mid-run and in a second browser see the same state, stop and resume, chat with the result,
compare two rows, and a bad data path's error beside its field.

Each test saves a screenshot of its page under its tmp_path; with SLIMTUNE_SCREENSHOTS=DIR (scripts/ui_screenshots.sh
sets docs/ui) they are written there too, for docs/web-app.md."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from conftest import lora_run_config

CHROMIUM = "/usr/bin/chromium"
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no {CHROMIUM}: apt-get install chromium to run the "
                       "browser tests (scripts/ui_screenshots.sh runs them alone)"),
]
pytest.importorskip("fastapi", reason="the web app's extra is not installed: pip install 'slimtune[ui]'")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
pytest.importorskip("uvicorn", reason="the web app's extra is not installed: pip install 'slimtune[ui]'")

from live import serving  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
WAIT = 180_000  # ms: a step of the tiny model is ~20 ms, but starting `slimtune train` takes ~10 s on a busy 2-core CI


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    """The app on 127.0.0.1 (a free port) in a thread, its working directory holding the tiny model and data."""
    work = tmp_path_factory.mktemp("ui-browser")
    shutil.copytree(tiny_model_dir, work / "tiny")
    lora_run_config(work, work / "tiny", "unused")  # writes train.jsonl (32 records of ~46 tokens)
    with serving(work) as port:
        yield f"http://127.0.0.1:{port}", work


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def shot(pg, tmp_path: Path, name: str) -> None:
    pg.screenshot(path=str(tmp_path / f"{name}.png"), full_page=True)
    if os.environ.get("SLIMTUNE_SCREENSHOTS"):
        out = Path(os.environ["SLIMTUNE_SCREENSHOTS"])
        out.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(out / f"{name}.png"))  # the viewport: small enough to commit


def fill_setup(pg, url: str, output: str, steps: int, save_every: int = 5) -> None:
    pg.goto(url + "/#setup")
    pg.wait_for_selector('[name="method.r"]')
    for name, value in [("model.path", "tiny"), ("data.train", "train.jsonl"), ("data.max_len", "64"),
                        ("method.r", "4"), ("method.target_modules", "q_proj,v_proj"), ("train.max_steps", str(steps)),
                        ("train.save_every", str(save_every)), ("train.lr", "0.01"), ("train.output_dir", output),
                        ("budget", "24")]:
        pg.fill(f'[name="{name}"]', value)
    pg.select_option('[name="train.device"]', "cpu")
    pg.select_option('[name="train.precision"]', "fp32")


def points(pg) -> int:
    return int(pg.get_attribute("#chart-loss", "data-points") or 0)


def test_setup_shows_the_estimate_preview_and_errors_beside_fields(app, page, tmp_path):
    url, work = app
    fill_setup(page, url, "runs/setup", 10)
    page.wait_for_function("document.querySelector('#params')?.textContent.includes('1,792')", timeout=WAIT)
    assert "fits" in page.inner_text(".fit")
    page.wait_for_selector("#preview-counts")
    assert "32 records read" in page.inner_text("#preview-counts")
    assert page.locator(".record .seg.trained").count() == 3  # one trained part per record shown
    assert "max_len: 64" in page.inner_text("#yaml")
    shot(page, tmp_path, "setup")
    page.fill('[name="data.train"]', "missing.jsonl")
    box = '.err[data-for="data.train"]'
    page.wait_for_function(f"document.querySelector('{box}').textContent.length > 0", timeout=WAIT)
    assert page.inner_text(box) == f"{work}/missing.jsonl: data file not found"  # as `slimtune inspect` says it
    page.fill('[name="data.train"]', "train.jsonl")
    page.fill('[name="budget"]', "0.1")  # less than the CUDA context alone
    budget = '.err[data-for="budget"]'
    page.wait_for_function(f"document.querySelector('{budget}').textContent.includes('does NOT fit')", timeout=WAIT)
    assert page.inner_text(budget).startswith("budget 0.1 GiB: predicted 0.54 GiB with the CUDA context")
    page.select_option('[name="method.name"]', "ia3")  # the method's own fields only
    assert page.locator('[name="method.r"]').count() == 0
    assert page.locator('[name="method.target_modules"]').count() == 1


def test_train_watch_reload_stop_resume_then_chat(app, page, browser, tmp_path):
    url, work = app
    fill_setup(page, url, "runs/live", 400)
    page.wait_for_selector("#peak", timeout=WAIT)
    page.click("#start-run")
    page.wait_for_selector('#run-status[data-status="running"]', timeout=WAIT)
    page.wait_for_function("Number(document.querySelector('#chart-loss').dataset.points || 0) > 5", timeout=WAIT)
    before = points(page)
    page.reload()  # the state lives in the run folder: the same run, its points again
    page.wait_for_selector('#run-status[data-status="running"]', timeout=WAIT)
    page.wait_for_function(f"Number(document.querySelector('#chart-loss').dataset.points || 0) >= {before}",
                           timeout=WAIT)
    other = browser.new_context().new_page()  # a second browser sees it too, from the folder alone
    other.goto(url + "/#train")
    other.wait_for_selector('#run-status[data-status="running"]', timeout=WAIT)
    assert other.input_value("#run-folder") == str(work / "runs" / "live")
    other.context.close()
    shot(page, tmp_path, "train")
    page.click("#stop")
    page.wait_for_selector('#run-status[data-status="stopped"]', timeout=WAIT)
    stopped = points(page)
    assert "resumable from" in page.inner_text("#run-status")
    page.click("#resume")
    page.wait_for_selector('#run-status[data-status="done"]', timeout=WAIT)
    assert points(page) > stopped
    assert "step 400 of 400" in page.inner_text("#run-status")

    page.click('nav a[data-tab="runs"]')
    page.wait_for_selector("#runs-table tr.pick")
    page.click("#runs-table tr.pick")
    page.wait_for_selector("#detail-chart .uplot")
    shot(page, tmp_path, "runs")

    page.click('nav a[data-tab="chat"]')
    page.fill("#chat-folder", str(work / "runs" / "live"))
    page.check("#chat-base")
    page.fill("#chat-max-new", "12")
    page.fill("#chat-input", "Say something about Paris.")
    page.press("#chat-input", "Enter")
    page.wait_for_selector("#chat-base-msgs .msg.assistant[data-done]", timeout=WAIT)
    answer = page.locator("#chat-run .msg.assistant")
    assert int(answer.get_attribute("data-streamed")) >= 2  # arrived in pieces, not at once
    assert answer.inner_text().strip()
    page.fill("#chat-input", "And about water?")  # a second turn: the conversation so far goes with it
    page.press("#chat-input", "Enter")
    page.wait_for_function("document.querySelectorAll('#chat-base-msgs .msg.assistant[data-done]').length == 2",
                           timeout=WAIT)
    assert page.locator("#chat-run .msg.user").all_inner_texts() == ["Say something about Paris.", "And about water?"]
    assert page.locator("#chat-run .msg.assistant[data-done]").count() == 2
    shot(page, tmp_path, "chat")


def test_compare_fills_its_table(app, page, tmp_path):
    url, work = app
    fill_setup(page, url, "runs/unused-compare", 6, save_every=0)
    page.wait_for_selector("#peak", timeout=WAIT)
    page.click('nav a[data-tab="compare"]')
    page.fill("#compare-methods", "base,lora")
    page.fill("#compare-output", "runs/cmp")
    page.click("#compare-start")
    page.wait_for_function("document.querySelector('#compare-status').textContent === 'finished'", timeout=WAIT)
    rows = page.locator("#compare-table tr")
    assert rows.count() == 3  # header, base, lora
    assert [rows.nth(i).locator("td").first.inner_text() for i in (1, 2)] == ["base", "lora"]
    page.wait_for_selector("#compare-charts img")
    shot(page, tmp_path, "compare")
