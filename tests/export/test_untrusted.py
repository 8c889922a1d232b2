"""Model files and run folders are untrusted input: a run's config.yaml never switches on the model's own
code, pickles load only as plain tensors, and each refusal is one line naming the file and what to do.
Also: a run on the embedded model records "embedded" in config.yaml (any machine) and its converted folder in
adapter_config.json (peft's AutoPeftModel loads it), and a hub id gets a message saying how to get it."""
from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import lora_run_config, write_jsonl
from slimtune import cli, models
from slimtune.trained import load_run

# imported by transformers only when it runs the folder's own code: the marker file says it ran
CUSTOM = """
import pathlib
pathlib.Path({marker!r}).write_text("custom code ran")
from transformers import LlamaConfig, LlamaForCausalLM


class MarkerConfig(LlamaConfig):
    model_type = {model_type!r}


class MarkerForCausalLM(LlamaForCausalLM):
    config_class = MarkerConfig
"""


class Payload:
    """Pickles as a call that writes a marker file: loading it with code execution would create the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pickle ran')",)


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model_dir) -> Path:
    """A LoRA run of 2 steps on the tiny model, shared; tests copy it before changing it."""
    tmp = tmp_path_factory.mktemp("untrusted")
    cfg = lora_run_config(tmp, tiny_model_dir, "run", max_steps=2, eval_at_start=False, data={"eval_size": 0})
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    return tmp / "run"


def custom_model(tmp: Path, src: Path, model_type: str = "markerllama") -> tuple[Path, Path]:
    """(folder, marker): a copy of the tiny model whose config.json's auto_map names custom.py."""
    folder, marker = tmp / "custom-model", tmp / "MARKER"
    shutil.copytree(src, folder)
    (folder / "custom.py").write_text(CUSTOM.format(marker=str(marker), model_type=model_type))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "custom.MarkerConfig",
                                                   "AutoModelForCausalLM": "custom.MarkerForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def downloaded_run(tmp: Path, run: Path, model_dir: Path, trust: bool = True) -> Path:
    """A copy of the run whose config.yaml points at model_dir and says model.trust_remote_code: trust."""
    folder = tmp / "downloaded-run"
    shutil.copytree(run, folder)
    tree = yaml.safe_load((folder / "config.yaml").read_text())
    tree["model"].update(path=str(model_dir), trust_remote_code=trust)
    (folder / "config.yaml").write_text(yaml.safe_dump(tree))
    return folder


def command(name: str, folder: Path, tmp: Path) -> list[str]:
    """The CLI line of `name` on a run folder, with what each needs (prompts, test data, an output)."""
    data = write_jsonl(tmp / "test.jsonl", [{"instruction": "Say something about Paris.", "output": "Paris."}])
    extra = {"chat": ["--max-new-tokens", "2", "--device", "cpu"],
             "generate": ["--input", str(data), "--output", str(tmp / "pred.jsonl"), "--max-new-tokens", "2",
                          "--device", "cpu"],
             "eval": ["--data", str(data), "--output", str(tmp / "eval"), "--device", "cpu"],
             "merge": ["--output", str(tmp / "merged")]}[name]
    return [name, str(folder), *extra]


def error_line(err: str) -> str:
    """The one line of the error (stderr also holds transformers' weight-loading bar)."""
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def no_input(monkeypatch):
    """chat reads no line (as Ctrl-D), and transformers' [y/N] prompt would fail the test, not hang it."""
    def refuse(prompt=""):
        if "[y/N]" in prompt:
            pytest.fail(f"reached an interactive prompt: {prompt}")
        raise EOFError
    monkeypatch.setattr("builtins.input", refuse)


@pytest.mark.parametrize("name", ["chat", "generate", "eval", "merge"])
def test_run_config_cannot_switch_on_remote_code(name, tmp_path, run, tiny_model_dir, no_input, capsys):
    model_dir, marker = custom_model(tmp_path, tiny_model_dir)
    folder = downloaded_run(tmp_path, run, model_dir)
    assert cli.main(command(name, folder, tmp_path)) == 2
    err = error_line(capsys.readouterr().err)
    assert f"slimtune {name}: error: {folder / 'config.yaml'}" in err
    assert "pass --trust-remote-code if you trust" in err and "custom.MarkerForCausalLM" in err
    assert not marker.exists()
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("name", ["chat", "merge"])
def test_the_users_flag_is_honoured(name, tmp_path, run, tiny_model_dir, no_input):
    model_dir, marker = custom_model(tmp_path, tiny_model_dir)
    folder = downloaded_run(tmp_path, run, model_dir)
    assert cli.main(command(name, folder, tmp_path) + ["--trust-remote-code"]) == 0
    assert marker.read_text() == "custom code ran"
    if name == "merge":  # the merged model keeps the code it needs, and names it
        assert (tmp_path / "merged" / "custom.py").is_file()
        assert "auto_map" in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_merge_without_flag_copies_no_code(tmp_path, run, tiny_model_dir, no_input, capsys):
    """A folder of a known architecture that also names custom code (as many hub folders do): without the
    flag transformers' own class loads it, the code never runs, and the output names no .py."""
    model_dir, marker = custom_model(tmp_path, tiny_model_dir, model_type="llama")
    folder = downloaded_run(tmp_path, run, model_dir, trust=False)
    assert cli.main(command("merge", folder, tmp_path)) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert notes == [f"warning: {model_dir / 'config.json'}: auto_map -> custom.MarkerConfig, "
                     "custom.MarkerForCausalLM: not run; transformers' own 'llama' code loads this model instead "
                     "(to run the folder's code, pass --trust-remote-code if you trust it)"]
    merged = tmp_path / "merged"
    assert not marker.exists() and not list(merged.glob("*.py"))
    assert "auto_map" not in json.loads((merged / "config.json").read_text())


@pytest.mark.parametrize("argv", [["targets", "{model}"], ["inspect", "{data}", "--model", "{model}"],
                                  ["eval", "--base", "{model}", "--data", "{data}"]])
def test_custom_architecture_without_flag_is_one_clear_line(argv, tmp_path, tiny_model_dir, no_input, capsys):
    model_dir, marker = custom_model(tmp_path, tiny_model_dir)
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello."}])
    assert cli.main([a.format(model=model_dir, data=data) for a in argv]) == 2
    err = error_line(capsys.readouterr().err)
    assert f"error: {model_dir / 'config.json'}: auto_map -> custom.MarkerConfig" in err
    assert "model_type 'markerllama' exists only as this folder's own Python" in err
    assert "pass --trust-remote-code" in err and not marker.exists()


def test_pickled_base_weights_are_refused_by_name(tmp_path, tiny_model_dir, capsys):
    folder, marker = tmp_path / "bin-model", tmp_path / "PWNED"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": Payload(marker)}, folder / "pytorch_model.bin")
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Hi", "output": "Hello."}])
    assert cli.main(["eval", "--base", str(folder), "--data", str(data)]) == 2
    err = error_line(capsys.readouterr().err)
    assert f"error: {folder / 'pytorch_model.bin'}: not plain tensors (" in err
    assert "(it calls exec)" in err and "convert it to safetensors" in err and "weights_only=False" not in err
    assert not marker.exists()


def test_plain_pickled_tensors_still_load(tmp_path, tiny_model_dir):
    """weights_only refuses code, not .bin files: a pickle of plain tensors loads as before."""
    folder = tmp_path / "bin-model"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").unlink()
    reference, _ = models.load(str(tiny_model_dir))
    torch.save(reference.state_dict(), folder / "pytorch_model.bin")
    model, _ = models.load(str(folder))
    assert torch.equal(model.model.embed_tokens.weight, reference.model.embed_tokens.weight)


def test_pickled_adapter_is_refused_by_name(tmp_path, run, capsys, no_input):
    folder, marker = tmp_path / "bin-run", tmp_path / "PWNED"
    shutil.copytree(run, folder)
    (folder / "adapter_model.safetensors").unlink()
    torch.save({"base_model.model.lm_head.weight": Payload(marker)}, folder / "adapter_model.bin")
    assert cli.main(["chat", str(folder), "--device", "cpu"]) == 2
    err = error_line(capsys.readouterr().err)
    assert f"error: {folder / 'adapter_model.bin'}: not plain tensors (it calls exec)" in err
    assert "convert it to safetensors" in err and not marker.exists()


def test_pickled_checkpoint_state_is_refused_by_name(tmp_path, tiny_model_dir):
    from slimtune import config, methods
    from slimtune.runs import checkpoint

    cfg = config.load(lora_run_config(tmp_path, tiny_model_dir, "run"))
    model = methods.apply(models.load(str(tiny_model_dir))[0], cfg.method)
    folder = checkpoint.save(tmp_path / "run", 1, model, cfg, {"step": 1}, keep=0)
    assert checkpoint.load(folder, model) == {"step": 1}
    marker = tmp_path / "PWNED"
    torch.save({"step": Payload(marker)}, folder / checkpoint.STATE)
    with pytest.raises(models.UnsafeFileError) as err:
        checkpoint.load(folder, model)
    assert str(err.value).startswith(f"{folder / checkpoint.STATE}: not plain tensors (it calls exec); ")
    assert "delete this checkpoint folder to resume from an earlier one" in str(err.value)
    assert not marker.exists()


def test_hub_id_says_slimtune_never_downloads(capsys):
    assert cli.main(["targets", "meta-llama/Llama-3.2-1B"]) == 2
    err = error_line(capsys.readouterr().err)
    assert err.startswith("slimtune targets: error: model.path: meta-llama/Llama-3.2-1B does not exist here; if it "
                          "is a model hub id: slimtune never downloads, it loads a local transformers folder, a "
                          ".gguf file or 'embedded'.")
    assert "`hf download meta-llama/Llama-3.2-1B --local-dir DIR`" in err and "model.path=DIR" in err
    with pytest.raises(FileNotFoundError, match=r"nope/a/b does not exist \(give a transformers model folder"):
        models.resolve("./nope/a/b")  # a local path: no hub advice


def test_embedded_runs_record_a_base_that_loads(tmp_path, tiny_model_dir, monkeypatch):
    """adapter_config.json names the embedded model's converted folder, so AutoPeftModelForCausalLM loads the
    run offline with slimtune's logits (it named "embedded", which peft looked up on the model hub: OSError);
    config.yaml keeps "embedded", which load_run resolves to wherever the embedded model is on the loading
    machine. No model hub lookup is tried on the way."""
    import huggingface_hub
    from peft import AutoPeftModelForCausalLM

    from slimtune.assets import embedded_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "here"))
    shutil.copytree(tiny_model_dir, embedded_folder())  # as converted: model.safetensors is there
    cfg = lora_run_config(tmp_path, Path("embedded"), "run", max_steps=2, save_every=1, eval_at_start=False,
                          data={"eval_size": 0})
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(remote file|Could not find a config file)")
        assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    run = tmp_path / "run"
    for folder in (run, run / "checkpoints" / "step-000002"):
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            str(embedded_folder().resolve())
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["path"] == "embedded"
    model, tokenizer, _ = load_run(run)
    ids = tokenizer(["Say something about Paris."], return_tensors="pt")
    with torch.no_grad():
        expected = model(**ids).logits
        assert torch.equal(AutoPeftModelForCausalLM.from_pretrained(run).eval()(**ids).logits, expected)
    here = embedded_folder()
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "there"))  # another machine, its own cache
    shutil.move(here, embedded_folder())
    moved, _, cfg_loaded = load_run(run)
    assert cfg_loaded.model.path == "embedded"
    with torch.no_grad():
        assert torch.equal(moved(**ids).logits, expected)


@pytest.fixture
def custom_run(tmp_path, tiny_model_dir, no_input) -> tuple[Path, Path]:
    """(run folder, marker): a run trained with model.trust_remote_code=true on a model that exists only as its
    folder's own Python, checkpoints kept as a stopped run's are; the marker of that legitimate run is removed."""
    model_dir, marker = custom_model(tmp_path, tiny_model_dir)
    cfg = lora_run_config(tmp_path, model_dir, "run", max_steps=2, save_every=1, eval_at_start=False,
                          data={"eval_size": 0})
    assert cli.main(["train", str(cfg), "--no-progress", "model.trust_remote_code=true"]) == 0
    assert marker.read_text() == "custom code ran"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["trust_remote_code"] is True
    marker.unlink()
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        del sys.modules[name]  # else a second import in this process finds the module and writes no marker
    return tmp_path / "run", marker


def test_resume_from_a_run_folders_config_needs_the_users_flag(custom_run, capsys):
    """The issue's case: `slimtune train RUN/config.yaml --resume`, no flag and no override, imported the model's
    Python because the run's config.yaml said model.trust_remote_code: true."""
    run, marker = custom_run
    for extra in ([], ["train.resume=auto"]):
        assert cli.main(["train", str(run / "config.yaml"), "--resume", "--no-progress", *extra]) == 2
        err = error_line(capsys.readouterr().err)
        assert err == (f"slimtune train: error: {run / 'config.yaml'}: model.trust_remote_code: true, and "
                       f"{marker.parent / 'custom-model' / 'config.json'}: auto_map -> custom.MarkerConfig, "
                       "custom.MarkerForCausalLM; a run folder's config.yaml cannot switch on the model's own code: "
                       f"pass --trust-remote-code if you trust {marker.parent / 'custom-model'}")
        assert not marker.exists()
    step = run / "checkpoints" / "step-000002" / "config.yaml"  # a checkpoint's own config, the same
    assert cli.main(["train", str(step), "--resume", "--no-progress"]) == 2
    assert "a run folder's config.yaml cannot switch on" in error_line(capsys.readouterr().err)
    assert not marker.exists()


@pytest.mark.parametrize("said", [["--trust-remote-code"], ["model.trust_remote_code=true"]])
def test_resume_with_the_users_own_say_goes_on(said, custom_run, capsys):
    """The flag, or the override, on the command line: the run resumes on its model's own code."""
    run, marker = custom_run
    assert cli.main(["train", str(run / "config.yaml"), "--resume", "--no-progress", *said]) == 0
    assert f"resuming from {run / 'checkpoints' / 'step-000002'} at step 2 of 2" in capsys.readouterr().out
    assert marker.read_text() == "custom code ran"


def test_web_app_resume_needs_the_users_flag(custom_run):
    """The web app's Resume (POST /api/runs/resume) ran the same command: refused before any process starts."""
    pytest.importorskip("fastapi", reason="the web app's extra is not installed: pip install 'slimtune[ui]'")
    from fastapi.testclient import TestClient

    from slimtune.ui.paths import Roots
    from slimtune.ui.server import create_app

    run, marker = custom_run
    client = TestClient(create_app(Roots.at(run.parent)), base_url="http://127.0.0.1")
    r = client.post("/api/runs/resume", json={"folder": str(run)})
    assert r.status_code == 400
    assert r.json()["error"].startswith(f"{run / 'config.yaml'}: model.trust_remote_code: true, and ")
    assert r.json()["error"].endswith(f"cannot switch on the model's own code: resume it on the command line, "
                                      f"`slimtune train {run / 'config.yaml'} --resume --trust-remote-code`, if "
                                      f"you trust {marker.parent / 'custom-model'}")
    assert not marker.exists() and not (run.parent / "runs" / ".slimtune-ui").exists()  # nothing was started


def test_a_config_of_the_users_own_still_switches_it_on(custom_run, capsys):
    """The user's own YAML (not a run folder's config.yaml) that sets model.trust_remote_code: true resumes
    with no flag, as it trained."""
    run, marker = custom_run
    mine = run.parent / "mine.yaml"
    tree = yaml.safe_load((run.parent / "run.yaml").read_text())
    tree["model"]["trust_remote_code"] = True
    mine.write_text(yaml.safe_dump(tree))
    assert cli.main(["train", str(mine), "--resume", "--no-progress"]) == 0
    assert "resuming from" in capsys.readouterr().out and marker.read_text() == "custom code ran"
