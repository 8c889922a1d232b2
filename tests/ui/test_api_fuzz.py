"""Fuzzing the web app's endpoints through TestClient: whatever the JSON body, the raw bytes or the path string,
the answer is a 2xx or a 4xx in the app's error shape ({"error": one line or more, "fields": {...}}), never a
500. No fuzzed request starts a process: Launcher.launch (the one place the app starts `slimtune train|compare`)
only records what it was asked."""
from __future__ import annotations

import json
import os
import typing
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi", reason="the web app's extra is not installed: pip install 'slimtune[ui]'")
from fastapi.testclient import TestClient  # noqa: E402

from slimtune.config import Config  # noqa: E402
from slimtune.ui import runs  # noqa: E402
from slimtune.ui.paths import Roots  # noqa: E402
from slimtune.ui.server import create_app  # noqa: E402

SECTIONS = {s: list(typing.get_type_hints(typing.get_type_hints(Config)[s])) for s in ("model", "data", "method",
                                                                                         "train")}
ODD = ["\x00", "\ud800", "\udcff", "\U0001f600", "~", "/", ".", "\\", "%", " "]
PATHS = st.one_of(
    st.sampled_from(["", ".", "..", "/", "~", "~root", "~nosuchuser-slimtune/x", "runs", "runs/..", "/etc/passwd",
                     "loop", "loop/x", "a\x00b", "\ud800", "runs/\udcff", "x" * 5000, "runs/../../..", "data.jsonl"]),
    st.text(alphabet=st.one_of(*[st.characters(codec="utf-8")] * 4, st.sampled_from(ODD)), max_size=30))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=2 ** 64),
                    st.floats(allow_nan=True, allow_infinity=True), PATHS)
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(PATHS, inner, max_size=3),
                    max_leaves=8)
# a form's tree: its real sections and keys mostly (so the paths get checked), anything at all sometimes
FORMS = st.fixed_dictionaries({}, optional={
    section: st.one_of(st.fixed_dictionaries({}, optional={k: st.one_of(PATHS, PATHS, JSON) for k in keys}), JSON)
    for section, keys in SECTIONS.items()})


def _named_model(tree):
    """model.path never left to its default, which would load the embedded model on every estimate."""
    if isinstance(tree, dict) and (tree.get("model") is None or isinstance(tree["model"], dict)):
        model = tree.get("model") or {}
        tree = {**tree, "model": {**model, "path": model.get("path") or "nothing-here"}}
    return tree


TREES = st.integers(0, 4).flatmap(lambda i: FORMS if i else JSON).map(_named_model)
MESSAGES = st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                     "content": PATHS}), max_size=3), JSON)
POSTS = {
    "/api/config": {"tree": TREES},
    "/api/preview": {"tree": TREES, "n": st.one_of(st.integers(-5, 5), JSON)},
    "/api/estimate": {"tree": TREES, "budget": st.one_of(st.sampled_from(["1", "24GiB", "1e400", "-1", "nan"]),
                                                         PATHS, JSON)},
    "/api/runs/start": {"tree": TREES},
    "/api/runs/stop": {"folder": PATHS},
    "/api/runs/resume": {"folder": PATHS},
    "/api/compare/start": {"tree": TREES, "methods": st.one_of(PATHS, JSON), "output": PATHS},
    "/api/compare/stop": {"folder": PATHS},
    "/api/chat": {"folder": PATHS, "messages": MESSAGES, "sampling": JSON, "base": JSON, "system": PATHS,
                  "device": st.one_of(PATHS, JSON)},
}
GETS = {"/api/file": "path", "/api/run": "folder", "/api/runs": "dir", "/api/compare": "folder",
        "/api/run/events": "folder"}
SETTINGS = settings(max_examples=40, deadline=None, database=None,  # no .hypothesis folder left behind
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app on a working directory with a run folder, a data file, a link loop; its launches recorded."""
    work = tmp_path_factory.mktemp("fuzz")
    (work / "runs" / "old").mkdir(parents=True)
    (work / "runs" / "old" / "config.yaml").write_text("model: {path: nothing-here}\n")
    (work / "data.jsonl").write_text('{"instruction": "hi", "output": "there"}\n')
    os.symlink(work / "loop", work / "loop")
    started: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runs.Launcher, "launch", lambda self, folder, argv, kind: started.append(argv) or {"pid": None})
        client = TestClient(create_app(Roots.at(work)), base_url="http://127.0.0.1", raise_server_exceptions=False)
        yield client, started, work


def _check(r) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error", "fields"} and body["error"].strip(), body


def _body(keys: dict) -> st.SearchStrategy:
    """Mostly a body with the endpoint's keys (random values); sometimes some keys missing, any JSON at all, or
    bytes that may not be JSON (not UTF-8, nested past the parser's depth)."""
    kinds = [st.fixed_dictionaries(keys).map(json.dumps), st.fixed_dictionaries({}, optional=keys).map(json.dumps),
             JSON.map(json.dumps), st.binary(max_size=40),
             st.sampled_from([b"", b"{", b'{"tree": ', b"[" * 5000, b"\xed\xa0\x80", b'{"tree": "\xed\xa0\x80"}',
                              b"\xff{}", b"NaN"])]
    return st.integers(0, 9).flatmap(lambda i: kinds[max(0, i - 5)])


@pytest.mark.parametrize("url", list(POSTS))
@SETTINGS
@given(data=st.data())
def test_no_post_body_is_a_500(app, url, data):
    client, started, _ = app
    body = data.draw(_body(POSTS[url]), "body")
    kind = data.draw(st.sampled_from(["application/json"] * 8 + ["text/plain", None]), "content-type")
    _check(client.post(url, content=body, headers={"content-type": kind} if kind else {}))
    assert all(argv[0] in ("train", "compare") for argv in started)  # recorded, never run


@pytest.mark.parametrize("url", list(GETS))
@SETTINGS
@given(path=PATHS)
def test_no_path_string_is_a_500(app, url, path):
    client, _, _ = app
    query = f"{GETS[url]}={quote(path.encode('utf-8', 'surrogatepass'), safe='')}"
    _check(client.get(f"{url}?{query}" + ("&polls=1" if url.endswith("events") else "")))
