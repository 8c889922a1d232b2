"""`slimtune ui` on the command line: 127.0.0.1 unless told otherwise, another host refused without
--allow-remote, a missing extra named, and the served app answering from the directory it started in."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from slimtune import cli

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.5", "::"])
def test_another_host_is_refused_without_the_flag(host, capsys):
    assert cli.main(["ui", "--host", host, "--port", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"slimtune ui: error: --host {host}: the app would be reachable from other machines")
    assert "--allow-remote" in err


def test_without_the_extra_it_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn now raises ImportError
    assert cli.main(["ui", "--port", "1"]) == 2
    assert "pip install 'slimtune[ui]'" in capsys.readouterr().err


def test_it_serves_on_loopback_from_the_working_directory(tmp_path):
    pytest.importorskip("fastapi", reason="the web app's extra is not installed: pip install 'slimtune[ui]'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "slimtune", "ui", "--port", str(port)], cwd=tmp_path, env=env,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # the import of torch takes seconds on a busy CI machine
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as r:
                    info = json.load(r)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.1)
        else:
            raise AssertionError("slimtune ui did not answer in 60 s")
        assert info["work"] == str(tmp_path.resolve()) and info["runs"] == str(tmp_path.resolve() / "runs")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"/static/vendor/uPlot.iife.min.js" in r.read()  # the chart library from the package
        stream = urllib.request.urlopen(f"http://127.0.0.1:{port}/api/run/events?folder=runs/x", timeout=5)
        assert stream.readline() == b"event: state\n"  # a page watching a run: a stream that never ends by itself
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0  # Ctrl-C ends the stream and the server
        stream.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    err = proc.stderr.read()
    assert f"http://127.0.0.1:{port}/" in err and "Traceback" not in err
