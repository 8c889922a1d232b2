"""No verb writes over what it reads (slimtune/outputs.py): a written path is never, never holds and is never
inside the base model, is never an input data file, nor a file of the run it reads. Each refusal is one line,
exit 2, before anything loads, and not a byte of what was read changes."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import lora_run_config
from slimtune import cli


def _files(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted([root, *root.rglob("*")]) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dir) -> Path:
    """tiny model's GGUF export (base.gguf), a 2-step LoRA run on it (run/), and its data (train.jsonl)."""
    tmp = tmp_path_factory.mktemp("outputs")
    assert cli.main(["export", str(tiny_model_dir), "--output", str(tmp / "base.gguf")]) == 0
    cfg = lora_run_config(tmp, tmp / "base.gguf", "run", max_steps=2, eval_at_start=False, data={"eval_size": 0})
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    return tmp


def test_export_does_not_overwrite_the_base_model(work, capsys):
    """The issue's case: a run trained on base.gguf, exported to base.gguf: exit 0, the base replaced."""
    before = _files(work)
    assert cli.main(["export", str(work / "run"), "--output", str(work / "base.gguf")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"slimtune export: error: export --output {work / 'base.gguf'} is, holds, or is inside the base "
                   f"model {work / 'base.gguf'}, which this command reads: give another --output")
    assert _files(work) == before


BASE = "is, holds, or is inside the base model"
CASES = [  # (command line, the error after "slimtune VERB: error: ")
    (["export", "{w}/run", "--output", "{w}/run.gguf", "--format", "ollama", "--imatrix", "{w}/Modelfile"],
     "export --format ollama: Modelfile beside --output {w}/Modelfile is the input data "
     "{w}/Modelfile"),
    (["export", "{m}", "--output", "{m}/model.gguf"], "export --output {m}/model.gguf " + BASE + " {m}"),
    (["merge", "{w}/run", "--output", "{w}"], "merge --output {w} " + BASE + " {w}/base.gguf"),
    (["generate", "{w}/run", "--input", "{w}/train.jsonl", "--output", "{w}/train.jsonl"],
     "generate --output {w}/train.jsonl is the input data {w}/train.jsonl"),
    (["generate", "{w}/run", "--input", "{w}/train.jsonl", "--output", "{w}/run/config.yaml"],
     "generate --output {w}/run/config.yaml is, holds, or is inside the run's config.yaml {w}/run/config.yaml"),
    (["chat", "{w}/run", "--save", "{w}/run/adapter_model.safetensors"],
     "chat --save {w}/run/adapter_model.safetensors is, holds, or is inside the run's adapter_model.safetensors"),
    (["chat", "{w}/base.gguf", "--save", "{w}/base.gguf"], "chat --save {w}/base.gguf " + BASE + " {w}/base.gguf"),
    (["eval", "--base", "{m}", "--data", "{w}/train.jsonl", "--output", "{m}/eval"],
     "eval --output {m}/eval " + BASE + " {m}"),
    (["eval", "{w}/run", "--data", "{w}/train.jsonl", "--output", "{w}/run"],
     "eval --output {w}/run is, holds, or is inside the run's config.yaml"),
    (["eval", "{w}/run", "--data", "{w}/ev/scores.json", "--output", "{w}/ev"],
     "eval --output {w}/ev (its scores.json) is the input data {w}/ev/scores.json"),
    (["compare", "{w}/run.yaml", "data.eval_size=4", "--methods", "lora", "--output", "{w}/base.gguf"],
     "compare --output {w}/base.gguf " + BASE + " {w}/base.gguf"),
    (["train", "{w}/run.yaml", "model.path={m}", "train.output_dir={m}/run"],
     "train.output_dir {m}/run " + BASE + " {m}"),
    (["train", "{w}/run.yaml", "train.output_dir={w}/train.jsonl"],
     "train.output_dir {w}/train.jsonl is the input data {w}/train.jsonl"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0][:1] + c[0][-2:]) for c in CASES])
def test_no_verb_writes_over_what_it_reads(argv, message, work, tiny_model_dir, capsys):
    (work / "ev").mkdir(exist_ok=True)
    (work / "ev" / "scores.json").write_text('{"instruction": "Hi", "output": "Hello."}\n')
    (work / "Modelfile").write_text('{"instruction": "Hi", "output": "Hello."}\n')
    before = _files(work, tiny_model_dir)
    fill = {"w": str(work), "m": str(tiny_model_dir)}
    assert cli.main([a.format(**fill) for a in argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and err[0].startswith(f"slimtune {argv[0]}: error: {message.format(**fill)}"), err
    assert _files(work, tiny_model_dir) == before


def test_merge_overwrite_never_replaces_a_folder_holding_the_data(work, tiny_model_dir, capsys):
    """merge --overwrite replaces its output folder whole: one that holds the run's data is refused."""
    merged = work / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    (merged / "train.jsonl").write_bytes((work / "train.jsonl").read_bytes())
    run = work / "run2"
    cfg = lora_run_config(work, work / "base.gguf", "run2", max_steps=1, eval_at_start=False,
                          data={"eval_size": 0, "train": str(merged / "train.jsonl")})
    assert cli.main(["train", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli.main(["merge", str(run), "--output", str(merged), "--overwrite"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"slimtune merge: error: merge --output {merged} is, holds, or is inside the training data "
        f"{merged / 'train.jsonl'}, which this command reads: give another --output")
    assert (merged / "train.jsonl").read_bytes() == (work / "train.jsonl").read_bytes()
