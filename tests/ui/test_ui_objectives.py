"""The web app and train.objective (FastAPI's TestClient, no browser): the form's schema names the objectives,
their knobs and data formats; a preference config is accepted, previewed and estimated on pairs (grpo on prompts)
as `slimtune estimate` does; a combination `slimtune train` refuses is refused with its one-line message; a compare
over objectives starts as the CLI's."""
from __future__ import annotations

import shutil

import pytest
import yaml

pytest.importorskip("fastapi", reason="the web app's extra is not installed: pip install 'slimtune[ui]'")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import WORDS, lora_run_config, write_jsonl  # noqa: E402
from slimtune import cli  # noqa: E402
from slimtune.ui.paths import Roots  # noqa: E402
from slimtune.ui.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir):
    """A working directory with the tiny model, answers (train.jsonl) and 24 preference pairs (pairs.jsonl)."""
    tmp = tmp_path_factory.mktemp("ui-objectives")
    (tmp / "runs").mkdir()
    shutil.copytree(tiny_model_dir, tmp / "tiny")
    lora_run_config(tmp, tmp / "tiny", "runs/x", max_steps=3)
    write_jsonl(tmp / "pairs.jsonl", [{"prompt": f"Say something about {w} ({i}).", "chosen": f"Here is {w}.",
                                       "rejected": "No."} for w in WORDS for i in range(3)])
    return tmp


@pytest.fixture(scope="module")
def client(work):
    return TestClient(create_app(Roots.at(work)), base_url="http://127.0.0.1")


def _tree(work, objective="dpo", **over) -> dict:
    tree = yaml.safe_load((work / "runs" / "x.yaml").read_text())
    tree["data"]["train"] = str(work / "pairs.jsonl")
    tree["train"].update(output_dir="runs/pref", objective=objective)
    for dotted, value in over.items():
        section, key = dotted.split("__")
        tree.setdefault(section, {})[key] = value
    return tree


def test_the_schema_names_objectives_their_knobs_and_data_formats(client):
    info = client.get("/api/info").json()
    assert info["choices"]["train.objective"] == ["sft", "dpo", "ipo", "simpo", "orpo", "kto", "grpo"]
    assert info["objective_fields"]["dpo"] == ["train.reference", "preference.beta", "preference.label_smoothing"]
    assert info["objective_fields"]["orpo"] == ["preference.orpo_lambda"] and info["objective_fields"]["sft"] == []
    assert info["sections"]["preference"]["beta"]["default"] == 0.1
    assert '"chosen", "rejected"' in info["data_hints"]["dpo"] and '"label"' in info["data_hints"]["kto"]
    assert info["objective_fields"]["grpo"][0] == "grpo.rewards" and "grpo" in info["sections"]


def test_a_preference_config_is_accepted_with_its_knobs(client, work):
    r = client.post("/api/config", json={"tree": _tree(work, "simpo", preference__beta=2.0,
                                                       preference__simpo_gamma=0.3)})
    assert r.status_code == 200, r.json()
    cfg = yaml.safe_load(r.json()["yaml"])
    assert cfg["train"]["objective"] == "simpo" and cfg["preference"]["beta"] == 2.0
    assert cfg["preference"]["simpo_gamma"] == 0.3


@pytest.mark.parametrize("over", [{"method__name": "prompt_tuning"},
                                  {"method__name": "full", "train__reference": "adapter_off"},
                                  {"train__objective": "orpo", "train__reference": "copy"}])
def test_a_combination_train_refuses_is_refused_with_its_message(client, work, capsys, over):
    tree = _tree(work, **over)
    r = client.post("/api/runs/start", json={"tree": tree})
    assert r.status_code == 400
    message = r.json()["error"]
    path = work / "refused.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(path), "--no-progress"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if " error: " in line]
    assert errors == [f"slimtune train: error: {message}"] and "\n" not in message
    assert next(iter(r.json()["fields"])) in ("train.objective", "train.reference")
    assert not (work / "runs" / "pref").exists()  # nothing started


def test_the_preview_shows_prompt_chosen_and_rejected(client, work, capsys):
    p = client.post("/api/preview", json={"tree": _tree(work), "n": 2}).json()
    assert p["pairs"] and p["read"] == 24 and len(p["records"]) == 2
    first = p["records"][0]
    assert [x["kind"] for x in first["parts"]] == ["prompt", "chosen", "rejected"]
    assert first["parts"][1]["text"].startswith("Here is Paris.") and first["parts"][2]["text"].startswith("No.")
    assert cli.main(["inspect", str(work / "pairs.jsonl"), "--model", str(work / "tiny"), "-n", "0",
                     "--objective", "dpo", "--max-len", "64"]) == 0
    out = capsys.readouterr().out
    assert p["summary"].replace("preview: ", "inspect: ") in out  # the same totals line
    assert p["summary"].startswith("preview: 24 pairs, ")


def test_the_estimate_reads_pairs_as_train_does(client, work):
    r = client.post("/api/estimate", json={"tree": _tree(work)})
    assert r.status_code == 200, r.json()  # the answers reader refused a pairs file before
    assert r.json()["trainable"] == 1792 and r.json()["peak_gib"] > 0


@pytest.mark.parametrize("objective", ["kto", "grpo"])
def test_the_estimate_is_the_clis_for_each_objective(client, work, capsys, objective):
    tree = _tree(work, objective)
    if objective == "grpo":
        write_jsonl(work / "prompts.jsonl", [{"prompt": f"Say something about {w}.", "answer": w} for w in WORDS])
        tree["data"]["train"] = str(work / "prompts.jsonl")
        tree["grpo"] = {"num_generations": 4, "max_new_tokens": 8, "rewards": ["contains:0.1"]}
    r = client.post("/api/estimate", json={"tree": tree, "budget": "1"})
    assert r.status_code == 200, r.json()
    e = r.json()
    path = work / f"estimate-{objective}.yaml"
    path.write_text(yaml.safe_dump(tree))
    assert cli.main(["estimate", str(path), "--budget", "1"]) == 0
    out = capsys.readouterr().out
    assert e["plan"] in out and e["table"] in out and e["verdict"] in out and e["fits"] and e["peak_gib"] > 0
    assert e["table"].startswith("grpo memory estimate: ") == (objective == "grpo")


def test_a_compare_over_objectives_starts_as_the_cli_would(client, work, monkeypatch):
    from slimtune.ui import runs

    started = []
    monkeypatch.setattr(runs.Launcher, "launch", lambda self, folder, argv, kind: started.append(argv) or {})
    r = client.post("/api/compare/start", json={"tree": _tree(work, "sft"), "objectives": "sft, dpo,orpo",
                                                "output": "runs/cmp"})
    assert r.status_code == 200, r.json()
    assert started[0][2:4] == ["--objectives", "sft,dpo,orpo"] and "--methods" not in started[0]
    r = client.post("/api/compare/start", json={"tree": _tree(work, "sft"), "methods": "base,lora",
                                                "objectives": "dpo", "output": "runs/cmp"})
    assert r.status_code == 400 and len(started) == 1
    assert r.json()["error"].startswith("setup: compare.methods.base: on preference pairs every row is scored")
