"""The exported file in use: an Ollama Modelfile with the same template and stops, `slimtune chat FILE.gguf`
and `slimtune eval --base FILE.gguf` on tiny random models."""
from __future__ import annotations

import json

import pytest

from conftest import CHATML, make_tokenizer, write_jsonl
from slimtune import cli
from slimtune.export import gguf as gguf_mod
from slimtune.export import merge as merge_mod
from slimtune.export import ollama

CONVS = [[{"role": "user", "content": "Hi there"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
          {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": '你好 "quoted"\n'}],
         [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]]
CHATML_GO = ('{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n<|im_start|>user\n{{ else }}'
             '<|im_start|>user\n{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}{{ .Content }}<|im_end|>\n'
             '<|im_start|>assistant\n{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n<|im_start|>user\n'
             '{{ end }}{{ end }}')


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("ollama")
    path = tmp / "tiny.gguf"
    assert cli.main(["export", str(tiny_model_dir), "--format", "ollama", "--output", str(path)]) == 0
    return path


def test_modelfile_has_the_template_and_stops(exported, capsys):
    text = (exported.parent / "Modelfile").read_text(encoding="utf-8")
    assert text == f'FROM ./tiny.gguf\nTEMPLATE """{CHATML_GO}"""\nPARAMETER stop "<|im_end|>"\n'
    ollama.write_modelfile(exported)
    assert f"cd {exported.parent} && ollama create tiny -f Modelfile" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["auto", "llama3", "llama2", "bloom", "chatml", "gemma3", "phi3", "phi4", "qwen3"])
def test_go_template_renders_as_the_chat_template(family):
    """Rendering the Modelfile's pieces as Ollama does gives the Jinja template's text for every
    conversation ending in a user turn (what Ollama sends the model)."""
    tok = make_tokenizer()
    template = CHATML if family == "auto" else merge_mod.jinja_template(family, tok)
    p = ollama.pieces(template, tok.bos_token, tok.eos_token)
    for conv in CONVS:
        want = ollama.render_jinja(template, conv, tok.bos_token, tok.eos_token, True)
        assert ollama.render_like_ollama(p, conv) == want, family
    # Llama-2's "[/INST] " space starts the answer: only the last user turn ends before it
    assert ("{{ if $last }} [/INST]{{ else }} [/INST] {{ end }}" in ollama.go_template(p)) == (family == "llama2")


def test_template_that_varies_by_position_is_refused():
    odd = "{% for m in messages %}{{ m['content'] }}{% if loop.index > 2 %}!{% endif %}|{% endfor %}"
    with pytest.raises(gguf_mod.ExportError, match="cannot be expressed as an Ollama Go template"):
        ollama.pieces(odd)


def test_chat_on_the_gguf_file(exported, monkeypatch, capsys, tiny_model_dir):
    lines = iter(["Hi", "/exit"])
    monkeypatch.setattr("builtins.input", lambda _prompt="": next(lines))
    assert cli.main(["chat", str(exported), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert "assistant> " in out and "[4 tokens" in err  # a random model does not stop early: all 4 made


def test_eval_base_gguf_matches_the_folder(exported, tiny_model_dir, tmp_path, capsys):
    """`slimtune eval --base FILE.gguf` scores the file as the folder it came from (f16: within 1%)."""
    rows = [{"instruction": f"Say something about {w}.", "output": f"Here is {w}. {w} is nice."}
            for w in ("Paris", "blue", "seven", "a dog")]
    data = write_jsonl(tmp_path / "held.jsonl", rows)
    losses = {}
    for name, base in (("folder", tiny_model_dir), ("gguf", exported)):
        assert cli.main(["eval", "--base", str(base), "--data", str(data), "--output", str(tmp_path / name),
                         "--device", "cpu"]) == 0
        losses[name] = json.loads((tmp_path / name / "scores.json").read_text())["eval_loss"]
    assert abs(losses["gguf"] / losses["folder"] - 1) <= 0.01, losses
    capsys.readouterr()
