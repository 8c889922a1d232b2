"""The web app's API (FastAPI's TestClient, no browser): paths outside the roots refused, another host refused
without the flag, and every answer equal to what the CLI says for the same input (error text, estimate, params,
inspect's counts, a generated answer)."""
from __future__ import annotations

import json
import os
import re
import shutil
import time

import pytest
import yaml

pytest.importorskip("fastapi", reason="the web app's extra is not installed: pip install 'slimtune[ui]'")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import lora_run_config  # noqa: E402
from slimtune import cli  # noqa: E402
from slimtune.evaluate.generate import Sampling, answer_all  # noqa: E402
from slimtune.trained import load_run  # noqa: E402
from slimtune.ui import HostRefused, check_host  # noqa: E402
from slimtune.ui.paths import Roots  # noqa: E402
from slimtune.ui.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir):
    """A working directory with the tiny model, data, a config and a finished 3-step run (runs/done)."""
    tmp = tmp_path_factory.mktemp("ui")
    (tmp / "runs").mkdir()
    shutil.copytree(tiny_model_dir, tmp / "tiny")  # inside the app's roots
    path = lora_run_config(tmp, tmp / "tiny", "runs/done", max_steps=3)
    assert cli.main(["train", str(path), "--no-progress"]) == 0
    return tmp


@pytest.fixture(scope="module")
def client(work):
    return TestClient(create_app(Roots.at(work)), base_url="http://127.0.0.1")


def form(work, tiny_model_dir, **train) -> dict:
    tree = yaml.safe_load((work / "runs" / "done.yaml").read_text())
    tree["train"].update(output_dir="runs/new", **train)
    return tree


def events(text: str) -> list[tuple[str, object]]:
    """(name, data) of each server-sent event."""
    out = []
    for chunk in text.strip().split("\n\n"):
        name = re.search(r"^event: (.*)$", chunk, re.M).group(1)
        out.append((name, json.loads(re.search(r"^data: (.*)$", chunk, re.M).group(1))))
    return out


@pytest.mark.parametrize("get", ["/api/file?path=/etc/hostname", "/api/run?folder=/etc", "/api/runs?dir=/",
                                 "/api/file?path=../../../etc/hostname", "/api/compare?folder=/tmp"])
def test_a_path_outside_the_roots_is_refused(client, get):
    r = client.get(get)
    assert r.status_code == 403
    assert "outside the folders this app may use" in r.json()["error"]


def test_a_link_out_of_the_roots_is_refused(client, work):
    link = work / "link-out"
    if not link.exists():
        os.symlink("/etc", link)
    r = client.get("/api/file", params={"path": "link-out/hostname"})
    assert r.status_code == 403


def test_a_form_naming_a_path_outside_is_refused_beside_its_field(client, work, tiny_model_dir):
    tree = form(work, tiny_model_dir)
    tree["data"]["train"] = "/etc/passwd"
    r = client.post("/api/preview", json={"tree": tree})
    assert r.status_code == 403
    assert list(r.json()["fields"]) == ["data.train"]
    r = client.post("/api/runs/start", json={"tree": dict(tree, train={"output_dir": "/tmp/elsewhere"})})
    assert r.status_code == 403 and "train.output_dir" in r.json()["fields"]


def test_a_request_for_another_host_name_is_refused(work):
    """DNS rebinding: a page on evil.example resolved to 127.0.0.1 sends Host: evil.example."""
    app = create_app(Roots.at(work))
    assert TestClient(app, base_url="http://evil.example").get("/api/info").status_code == 403
    assert TestClient(app, base_url="http://localhost:7860").get("/api/info").status_code == 200
    assert TestClient(create_app(Roots.at(work), None), base_url="http://evil.example").get("/").status_code == 200


def test_a_cross_site_form_post_does_nothing(client, work, tiny_model_dir):
    """A page elsewhere can post a form (text/plain, no CORS preflight) but not JSON: the body is not read."""
    body = json.dumps({"tree": form(work, tiny_model_dir)})
    r = client.post("/api/runs/start", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 422 and not (work / "runs" / ".slimtune-ui").exists()


def test_another_host_needs_the_flag():
    assert check_host("127.0.0.1", False) is None
    with pytest.raises(HostRefused, match="--allow-remote"):
        check_host("0.0.0.0", False)
    assert "anyone who can reach this port" in check_host("0.0.0.0", True)


def test_a_bad_data_path_says_what_the_cli_says(client, work, tiny_model_dir, capsys):
    tree = form(work, tiny_model_dir)
    tree["data"]["train"] = "missing.jsonl"
    r = client.post("/api/preview", json={"tree": tree})
    assert r.status_code == 400
    text = r.json()["fields"]["data.train"]
    assert cli.main(["inspect", str(work / "missing.jsonl"), "--model", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err == f"slimtune inspect: error: {text}\n"


def test_a_bad_record_says_what_the_cli_says(client, work, tiny_model_dir, capsys):
    (work / "bad.jsonl").write_text('{"instruction": "hi", "output": "x"}\n{"instruction": "hi"}\n')
    tree = form(work, tiny_model_dir)
    tree["data"]["train"] = "bad.jsonl"
    text = client.post("/api/preview", json={"tree": tree}).json()["fields"]["data.train"]
    assert "line 2" in text
    assert cli.main(["inspect", str(work / "bad.jsonl"), "--model", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err == f"slimtune inspect: error: {text}\n"


def test_an_unknown_method_and_key_are_named_beside_their_fields(client, work, tiny_model_dir):
    tree = form(work, tiny_model_dir)
    tree["method"]["name"] = "lorax"
    tree["train"]["lrr"] = 1
    fields = client.post("/api/config", json={"tree": tree}).json()["fields"]
    assert "'lorax' is not one of lora" in fields["method.name"]
    assert fields["train.lrr"] == "setup: train.lrr: unknown key (did you mean train.lr?)"


def test_the_estimate_equals_slimtune_estimate(client, work, tiny_model_dir, capsys):
    tree = form(work, tiny_model_dir)
    est = client.post("/api/estimate", json={"tree": tree, "budget": "0.4"}).json()
    (work / "est.yaml").write_text(yaml.safe_dump(tree))
    assert cli.main(["estimate", str(work / "est.yaml"), "--budget", "0.4"]) == 1  # CUDA context alone is 0.5 GiB
    out = capsys.readouterr().out
    assert est["table"] in out
    peak = float(re.search(r"predicted peak \(reserved\)\s+([\d.]+) GiB", out).group(1))
    assert round(est["peak_gib"], 2) == peak
    assert est["fits"] is False and est["budget_gib"] == 0.4 and est["fixes"] == []
    assert "no single change fits" in out and est["verdict"] in out.splitlines()
    assert cli.main(["params", str(work / "est.yaml")]) == 0
    assert f"trainable params: {est['trainable']:,} || all params: {est['total']:,}" in capsys.readouterr().out
    assert est["trainable"] == 2 * 4 * ((64 + 64) + (64 + 32))  # 2 layers, r=4 on q (64->64) and v (64->32)


def test_the_preview_counts_equal_slimtune_inspect(client, work, tiny_model_dir, capsys):
    tree = form(work, tiny_model_dir)
    tree["data"]["max_len"] = 40  # every record is 46-48 tokens: all cut
    p = client.post("/api/preview", json={"tree": tree, "n": 2}).json()
    assert cli.main(["inspect", tree["data"]["train"], "--model", str(tiny_model_dir), "-n", "0",
                     "--max-len", "40"]) == 0
    out = capsys.readouterr().out
    assert f"{p['stats']['records']} records, {p['stats']['tokens']} tokens" in out
    assert p["stats"]["truncated"] == p["stats"]["records"] == 32
    first = p["records"][0]
    heads = re.findall(r"=== .*?: (\d+) tokens, (\d+) prompt \(masked\), (\d+) trained", out)[0]
    assert (first["tokens"], first["prompt"], first["trained"]) == tuple(map(int, heads))
    assert [part["trained"] for part in first["parts"]] == [False, True]
    assert first["parts"][1]["text"].startswith("Here is Paris.")


def test_runs_list_and_state_come_from_the_folder(client, work):
    listed = client.get("/api/runs").json()["runs"]
    assert [r["name"] for r in listed] == ["done"]
    assert listed[0]["steps"] == 3 and listed[0]["done"]
    state = client.get("/api/run", params={"folder": "runs/done"}).json()
    assert state["status"] == "done" and state["step"] == 3 and state["total"] == 3
    assert [r["step"] for r in state["rows"] if "loss" in r] == [1, 2, 3]
    got = events(client.get("/api/run/events", params={"folder": "runs/done", "polls": 1}).text)
    assert [name for name, _ in got] == ["rows", "state"]
    assert len(got[0][1]) == len(state["rows"]) and got[1][1]["status"] == "done"


def test_chat_streams_the_answer_slimtune_generate_gives(client, work):
    r = client.post("/api/chat", json={"folder": "runs/done", "messages": [{"role": "user", "content": "Hello"}],
                                       "sampling": {"max_new_tokens": 8}})
    got = events(r.text)
    pieces = [d for name, d in got if name == "token"]
    assert got[-1][0] == "done" and len(pieces) >= 1
    assert "".join(pieces).strip() == got[-1][1]["text"]
    model, tok, cfg = load_run(work / "runs" / "done")
    hello = [[{"role": "user", "content": "Hello"}]]
    want = answer_all(model, tok, cfg.data.template, hello, Sampling(max_new_tokens=8))
    assert got[-1][1]["text"] == want.texts[0]
    assert got[-1][1]["new_tokens"] == want.new_tokens


def test_chat_with_a_folder_that_never_trained_says_so(client, work):
    (work / "runs" / "empty").mkdir(exist_ok=True)
    r = client.post("/api/chat", json={"folder": "runs/empty", "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 400 and "not a slimtune run folder" in r.json()["error"]


def test_chat_refuses_a_conversation_that_does_not_end_with_the_user(client):
    r = client.post("/api/chat", json={"folder": "runs/done", "messages": [{"role": "assistant", "content": "Hi"}]})
    assert r.status_code == 400 and r.json()["error"].startswith("messages: expected a list of {role, content}")


def wait(client, folder, test, seconds=120):
    end = time.time() + seconds
    while time.time() < end:
        state = client.get("/api/run", params={"folder": folder}).json()
        if test(state):
            return state
        time.sleep(0.3)
    raise AssertionError(f"timed out; last state {state['status']} step {state['step']}: {state['log'][-5:]}")


def test_start_stop_resume_a_background_run(client, work, tiny_model_dir):
    tree = form(work, tiny_model_dir, max_steps=3000, save_every=5, log_every=1)
    r = client.post("/api/runs/start", json={"tree": tree})
    assert r.status_code == 200
    folder = str(work / "runs" / "new")
    assert client.post("/api/runs/start", json={"tree": tree}).status_code == 409  # one run per folder
    wait(client, folder, lambda s: s["status"] == "running" and s["step"] >= 3)
    assert client.post("/api/runs/stop", json={"folder": folder}).status_code == 200
    stopped = wait(client, folder, lambda s: s["status"] == "stopped")
    assert stopped["checkpoint"] and stopped["total"] == 3000 and stopped["pid"] is None
    assert client.post("/api/runs/resume", json={"folder": folder}).status_code == 200
    going = wait(client, folder, lambda s: s["status"] == "running" and s["step"] > stopped["step"])
    assert going["remaining_s"] > 0
    client.post("/api/runs/stop", json={"folder": folder})
    again = wait(client, folder, lambda s: s["status"] == "stopped")
    steps = [r["step"] for r in again["rows"] if "loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # the resumed run went on where the checkpoint was
    assert client.post("/api/runs/stop", json={"folder": folder}).status_code == 409
