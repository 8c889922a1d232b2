"""The web app's request checks (slimtune/ui/guard.py and the shared request helpers): every malformed request
is a 4xx in the app's error shape with the CLI's words, never a 500 with a traceback; a body over the limit is
refused fast (with or without Content-Length); a page from another origin cannot start anything."""
from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the web app's extra is not installed: pip install 'slimtune[ui]'")
from fastapi.testclient import TestClient  # noqa: E402
from live import serving  # noqa: E402

from slimtune.ui import chat, runs  # noqa: E402
from slimtune.ui.paths import Roots  # noqa: E402
from slimtune.ui.server import create_app  # noqa: E402

LIMIT = 4 * 1024 * 1024  # guard.MAX_BODY
NUL = "model.path: 'a\\x00b' holds a NUL byte, which no file name can; give a path under the working directory"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guard")
    (tmp / "runs").mkdir()
    os.symlink(tmp / "loop", tmp / "loop")  # a link to itself: resolving it fails
    return tmp


@pytest.fixture(scope="module")
def client(work):
    return TestClient(create_app(Roots.at(work)), base_url="http://127.0.0.1:7860", raise_server_exceptions=False)


def post(client, url: str, body, **headers):
    """A JSON body as a browser sends it: escapes for what UTF-8 cannot hold (a lone surrogate)."""
    text = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(url, content=text, headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize("url, body, field, message", [
    ("/api/config", {"tree": {"model": {"path": "a\x00b"}}}, "model.path", NUL),
    ("/api/estimate", {"tree": {"model": {"path": "a\x00b"}}}, "model.path", NUL),
    ("/api/config", {"tree": {"data": {"train": "x\ud800.jsonl"}}}, "data.train",
     "tree.data.train: holds an unpaired surrogate (a \\ud800-style escape), which is not text; fix or remove that "
     "character"),
    ("/api/config", {"tree": {"model": 5}}, "config", "setup: model: expected a mapping, got 5"),
    ("/api/preview", {"tree": {"data": ["x.jsonl"]}}, "config", "setup: data: expected a mapping, got ['x.jsonl']"),
    ("/api/config", {"tree": {"model": {"path": 5}}}, "model.path", "setup: model.path: expected str, got 5"),
    ("/api/estimate", {"tree": {"data": {"train": ["a"]}}}, "data.train", "setup: data.train: expected str, got ['a']"),
    ("/api/config", {"tree": {"train": {"output_dir": "~nosuchuser-slimtune/x"}}}, "train.output_dir",
     "train.output_dir: ~nosuchuser-slimtune/x: Could not determine home directory; give a path under {work}"),
])
def test_a_bad_form_is_a_400_beside_its_field(client, work, url, body, field, message):
    r = post(client, url, body)
    assert r.status_code == 400
    assert r.json()["fields"] == {field: message.format(work=work)}


@pytest.mark.parametrize("method, url, body, message", [
    ("post", "/api/runs/stop", {"folder": "runs\x00"}, "folder: 'runs\\x00' holds a NUL byte"),
    ("post", "/api/runs/resume", {"folder": "\ud800"}, "folder: holds an unpaired surrogate (a \\ud800-style escape)"),
    ("post", "/api/chat", {"folder": "a\x00", "messages": []}, "folder: 'a\\x00' holds a NUL byte"),
    ("post", "/api/compare/start", {"tree": {}, "output": "r\x00"}, "output: 'r\\x00' holds a NUL byte"),
    ("get", "/api/file?path=a%00b", None, "path: 'a\\x00b' holds a NUL byte"),
    ("get", "/api/run?folder=runs%00", None, "folder: 'runs\\x00' holds a NUL byte"),
    ("get", "/api/runs?dir=loop/x", None, "dir: loop/x: "),  # resolve() or stat(): each Python words it
    ("get", "/api/run?folder=" + "x" * 300, None, f"folder: {'x' * 200}...: file name too long on this system"),
])
def test_a_path_no_file_can_have_is_a_400(client, method, url, body, message):
    r = post(client, url, body) if method == "post" else client.get(url)
    assert r.status_code == 400 and r.json()["error"].startswith(message)


@pytest.mark.parametrize("body, message", [
    (b'{"tree": {', "request body: not JSON (Expecting"),
    (b'{"folder": "runs", "messages": [5]}', "messages[0]: input should be a valid dictionary"),
    (b'{"folder": "runs"}', "messages: field required"),
    (b'[1, 2]', "folder: field required"),
])
def test_a_body_fastapi_cannot_read_says_so_in_the_apps_words(client, body, message):
    r = post(client, "/api/chat", body)
    assert r.status_code == 422 and r.json()["error"].startswith(message) and r.json()["fields"] == {}


@pytest.mark.parametrize("body, message", [
    (b"\xff{}", "request body: not UTF-8 text (invalid start byte at byte 0); send the form as JSON"),
    (b"[" * 100_000, "request body: JSON nested deeper than the server reads; send the form as the page builds it"),
])
def test_a_body_that_is_not_text_or_too_deep_is_a_400(client, body, message):
    r = post(client, "/api/config", body)
    assert r.status_code == 400 and r.json() == {"error": message, "fields": {}}


@pytest.mark.parametrize("form, message", [
    ({"max_new_tokens": "abc"}, "sampling.max_new_tokens: expected int, got 'abc'"),
    ({"top_k": 1e400}, "sampling.top_k: expected int, got inf"),
    ({"temperature": []}, "sampling.temperature: expected float, got []")])
def test_chat_sampling_of_the_wrong_type_is_named(form, message):
    with pytest.raises(chat.ChatError) as err:  # the server answers a ChatError with 400
        chat.sampling(form)
    assert str(err.value) == message
    assert chat.sampling({"max_new_tokens": "12", "top_p": 0.5}).max_new_tokens == 12


def test_a_body_over_the_limit_is_refused_with_or_without_its_length(client):
    big = b'{"tree": {"x": "' + b"a" * LIMIT + b'"}}'
    r = post(client, "/api/config", big)
    assert r.status_code == 413 and r.json()["error"].startswith("request body over 4 MiB")
    chunked = client.post("/api/config", content=iter([big[:1000]] * (LIMIT // 1000 + 1)),
                          headers={"content-type": "application/json"})  # an iterator: no Content-Length
    assert chunked.status_code == 413
    assert post(client, "/api/config", {"tree": {"x": "a" * (LIMIT - 100)}}).status_code == 400  # read


def _send(port: int, size: int, chunked: bool) -> tuple[bytes, float]:
    """POST size bytes to a live server as fast as it takes them; the status line and the seconds it took."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = b"POST /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Content-Length: %d\r\n\r\n" % size
    piece = b"a" * 65536

    def feed():
        try:
            sock.sendall(head)
            for _ in range(size // len(piece)):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        except OSError:  # the server answered and closed: the rest is not read
            pass
    start = time.perf_counter()
    threading.Thread(target=feed, daemon=True).start()
    got = b""
    while b"\r\n" not in got:
        data = sock.recv(4096)
        if not data:
            break
        got += data
    sock.close()
    return got.split(b"\r\n")[0], time.perf_counter() - start


def test_a_20_mb_body_is_refused_in_a_second_by_the_live_server(work):
    """Before the limit, a 200 MB body held the server for over a minute and 10 MB took 10 s."""
    pytest.importorskip("uvicorn")
    with serving(work) as port:
        for chunked in (False, True):
            status, seconds = _send(port, 20 * 1024 * 1024, chunked)
            assert status == b"HTTP/1.1 413 Request Entity Too Large" and seconds < 2, (chunked, status, seconds)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # and it serves on
            sock.sendall(b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 200")


def test_a_page_from_another_origin_cannot_start_a_run(client, work, monkeypatch):
    started = []
    monkeypatch.setattr(runs.Launcher, "launch", lambda self, *args: started.append(args) or {"pid": None})
    tree = {"data": {"train": "runs"}, "train": {"output_dir": "runs/x"}}
    for origin in ("http://evil.example", "null", "http://127.0.0.1:9999", "http://localhost:7860", "file://"):
        r = post(client, "/api/runs/start", {"tree": tree}, origin=origin)
        assert r.status_code == 403, origin
        assert r.json()["error"] == (f"Origin {origin!r} refused: only the app's own page may start, stop or change "
                                     "anything here; open it as http://127.0.0.1:7860/")
    assert started == []
    assert post(client, "/api/runs/stop", {"folder": "runs"}, origin="http://evil.example").status_code == 403
    own = post(client, "/api/config", {"tree": {"model": 5}}, origin="http://127.0.0.1:7860")
    assert own.status_code == 400  # the app's own page passes (and gets the form's error)
    assert post(client, "/api/runs/start", {"tree": tree}, origin="http://127.0.0.1:7860").status_code == 200
    assert [(folder, argv[0]) for folder, argv, _ in started] == [(work / "runs" / "x", "train")]
    assert client.get("/api/info", headers={"origin": "http://evil.example"}).status_code == 200  # reads nothing


def test_with_allow_remote_the_origin_must_still_match_the_host(work):
    app = TestClient(create_app(Roots.at(work), None), base_url="http://box.lan:7860")
    body = json.dumps({"tree": {"model": 5}})
    headers = {"content-type": "application/json"}
    assert app.post("/api/config", content=body, headers={**headers, "origin": "http://box.lan:7860"}).status_code \
        == 400
    assert app.post("/api/config", content=body, headers={**headers, "origin": "http://evil.example"}).status_code \
        == 403
