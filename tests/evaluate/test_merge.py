"""`slimtune merge` on tiny random models, for every method that merges: the merged folder gives the
adapter model's logits, loads in a fresh process with plain transformers, and generates the same
greedy tokens; family templates become equivalent Jinja chat templates."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tokenizer, write_jsonl
from slimtune import cli
from slimtune.data.templates import FAMILIES, render
from slimtune.export import merge as merge_mod

# (method, architecture, template): bitfit needs biases (Qwen2 has them on q/k/v); GPT-2's Conv1D
# layers store weights transposed (peft's fan_in_fan_out); llama3 exercises a written Jinja template
CASES = [("lora", "llama", "auto"), ("dora", "llama", "auto"), ("rslora", "llama", "auto"),
         ("pissa", "llama", "auto"), ("ia3", "llama", "auto"), ("full", "llama", "auto"),
         ("freeze", "llama", "auto"), ("bitfit", "qwen2", "auto"), ("lora", "gpt2", "auto"),
         ("lora", "llama", "llama3")]
IDS = [f"{m}-{a}-{t}" for m, a, t in CASES]
PROMPTS = ["Say something about Paris.", "Hi"]
FP32_EXACT = 1e-5  # the bar for tiny fp32 models

FRESH = r"""
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
prompts, out = json.loads(sys.stdin.read()), {}
for folder in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    rows = []
    for q in prompts:
        enc = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      return_dict=True, return_tensors="pt")
        gen = model.generate(**enc, do_sample=False, max_new_tokens=8)
        rows.append(gen[0, enc["input_ids"].shape[1]:].tolist())
    out[folder] = rows
assert not any(m.split(".")[0] in ("slimtune", "peft") for m in sys.modules), "imported slimtune or peft"
print(json.dumps(out))
"""


def tiny_model(vocab: int, arch: str):
    """conftest's tiny model with initializer_range 0.1, not 0.2: at 0.2 its logits reach ~7 on the probe
    records and the fp32 forward alone (adapter model in fp32 vs fp64) already differs by 1.2e-5, above
    the absolute 1e-5 bar whatever the merge does; at 0.1 that noise is ~2e-6, and 3 steps still move the
    logits by > 0.1."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(arch, vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               tie_word_embeddings=True, initializer_range=0.1)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer):
    """Each case trained 3 steps (lr 1e-2, so the adapter is far from its init) and merged in fp32."""
    tmp = tmp_path_factory.mktemp("merge")
    rows = [{"instruction": f"Say something about {w}.", "output": f"Here is {w}. {w} is nice."}
            for w in ("Paris", "blue", "seven", "a dog")] * 3
    data = write_jsonl(tmp / "train.jsonl", rows)
    out = {}
    for (method, arch, template), name in zip(CASES, IDS):
        model_dir = tmp / f"model-{arch}"
        if not model_dir.exists():
            tiny_model(len(tokenizer), arch).save_pretrained(model_dir)
            tokenizer.save_pretrained(model_dir)
        cfg = {"model": {"path": str(model_dir)},
               "data": {"train": str(data), "eval_size": 2, "max_len": 64, "template": template},
               "method": {"name": method, "r": 4, "dropout": 0.0, "trainable_layers": 1},
               "train": {"output_dir": str(tmp / name), "max_steps": 3, "lr": 1e-2, "micro_batch_size": 4,
                         "warmup_steps": 0, "eval_at_start": False}}
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        assert cli.main(["train", str(tmp / f"{name}.yaml"), "--no-progress"]) == 0
        result = merge_mod.merge(tmp / name, tmp / f"{name}-merged", "fp32", log=lambda *a: None)
        out[name] = (tmp / name, tmp / f"{name}-merged", result, model_dir)
    return out


def _ids(tokenizer):
    return tokenizer(["Say something about a dog and blue.", "Here is seven"], return_tensors="pt", padding=True)


@pytest.mark.parametrize("name", IDS)
def test_merged_logits_equal_adapter_logits(name, runs, tokenizer):
    from transformers import AutoModelForCausalLM

    from slimtune.trained import load_run

    run, merged_dir, result, model_dir = runs[name]
    assert result["merge_diff"] <= FP32_EXACT and result["saved_diff"] <= FP32_EXACT, result
    trained, _, _ = load_run(run)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = _ids(tokenizer)
    with torch.no_grad():
        want = trained(**enc).logits
        assert (merged(**enc).logits - want).abs().max() <= FP32_EXACT
        assert (base(**enc).logits - want).abs().max() > 1e-3  # the training shows: the check is not vacuous
    assert not (merged_dir / "adapter_config.json").exists()
    assert (merged_dir / "model.safetensors").is_file()


def test_fresh_process_with_plain_transformers_generates_the_same_tokens(runs, tokenizer):
    from slimtune.evaluate.generate import Sampling, answer_all as generate
    from slimtune.trained import load_run

    folders = [str(runs[n][1]) for n in IDS]
    done = subprocess.run([sys.executable, "-c", FRESH, *folders], input=json.dumps(PROMPTS) + "\n",
                          capture_output=True, text=True, timeout=600, cwd=runs[IDS[0]][0].parent)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    for name in IDS:
        model, tok, cfg = load_run(runs[name][0])
        ours = generate(model, tok, cfg.data.template, [[{"role": "user", "content": q}] for q in PROMPTS],
                        Sampling(max_new_tokens=8), batch_size=1)
        assert fresh[str(runs[name][1])] == ours.tokens, name


def test_merged_folder_carries_template_stop_tokens_and_chat_template(runs, tokenizer):
    from transformers import AutoTokenizer, GenerationConfig

    merged = runs["lora-llama-llama3"][1]
    gen = GenerationConfig.from_pretrained(merged)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert gen.eos_token_id == [tokenizer.eos_token_id, eot] and gen.pad_token_id == tokenizer.pad_token_id
    saved = json.loads((merged / "tokenizer_config.json").read_text())
    assert "<|start_header_id|>" in saved["chat_template"]  # in tokenizer_config.json itself
    tok = AutoTokenizer.from_pretrained(merged)
    conv = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
        render("llama3", conv, tokenizer, add_generation_prompt=True).text
    auto = AutoTokenizer.from_pretrained(runs["lora-llama-auto"][1])  # auto: the tokenizer's own template
    assert auto.chat_template == tokenizer.chat_template
    assert GenerationConfig.from_pretrained(runs["lora-llama-auto"][1]).eos_token_id == tokenizer.eos_token_id


CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": '你好 "quoted" {{ not jinja }}\n'}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}],
]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_jinja_template_renders_as_the_family_template(family):
    tok = make_tokenizer()  # its own: the session's tokenizer keeps its ChatML template
    tok.chat_template = merge_mod.jinja_template(family, tok)
    for conv in CONVERSATIONS:
        if conv[-1]["role"] == "user":  # generation prompts: exactly the text the model was trained on
            want = render(family, conv, tok, add_generation_prompt=True).text
            assert tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == want
        else:  # whole conversations: training drops the after-answer text (ChatML's "\n") after the last answer
            want = render(family, conv, tok).text + FAMILIES[family].after_answer
            assert tok.apply_chat_template(conv, tokenize=False) == want


def test_tolerance_check_refuses_large_and_nan_differences():
    merge_mod._check(5e-4, 38.5, "fp32", "merge")  # SmolLM2-sized logits: 2e-5 x 38.5 = 7.7e-4
    with pytest.raises(merge_mod.MergeError, match="exceeds the fp32 tolerance"):
        merge_mod._check(1e-3, 38.5, "fp32", "merge")
    with pytest.raises(merge_mod.MergeError):
        merge_mod._check(float("nan"), 10.0, "fp16", "saved")
    merge_mod._check(1.0, 38.5, "bf16", "saved")


def test_bf16_merge_and_refusals(runs, tmp_path, capsys):
    run = runs["lora-llama-auto"][0]
    assert cli.main(["merge", str(run), "--output", str(tmp_path / "m16"), "--dtype", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "in fp32" in out and "(lora, bf16) loaded back" in out
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(tmp_path / "m16" / "model.safetensors").values()} == {torch.bfloat16}
    assert cli.main(["merge", str(run), "--output", str(run)]) == 2  # never into a run folder
    assert f"merge --output {run} is, holds, or is inside the run folder" in capsys.readouterr().err


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_merge_refuses_outputs_that_would_overwrite_what_it_reads(runs, tmp_path, capsys):
    """The issue's case: merging into the base model's own folder overwrote model.safetensors, and the
    run's eval loss then moved, the adapter being applied to an already-merged base."""
    run, _, _, model_dir = runs["lora-llama-auto"]
    base, trained = _files(model_dir), _files(run)
    step = next((run / "checkpoints").iterdir())
    cases = [(run, model_dir, "is, holds, or is inside the base model"),
             (run, model_dir / "merged", "is, holds, or is inside the base model"),
             (run, model_dir.parent, "is, holds, or is inside the base model"),  # holds it
             (run, run / "merged", "is, holds, or is inside the run folder"),
             (step, run, "is, holds, or is inside the run folder")]  # a checkpoint's own run
    for folder, output, message in cases:
        assert cli.main(["merge", str(folder), "--output", str(output), "--overwrite"]) == 2, output
        err = capsys.readouterr().err
        assert f"slimtune merge: error: merge --output {output} {message}" in err, err
    assert _files(model_dir) == base and _files(run) == trained  # not one byte changed
    assert not (model_dir / "merged").exists() and not (run / "merged").exists()


def test_merge_into_a_non_empty_folder_needs_overwrite_and_replaces_atomically(runs, tmp_path, capsys):
    run = runs["lora-llama-auto"][0]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):  # --overwrite replaces a model folder only
        assert cli.main(["merge", str(run), "--output", str(mine), *extra]) == 2
        err = capsys.readouterr().err
        assert ("holds files but no merged model (config.json)" if extra else "not empty; pass --overwrite") in err
    assert _files(mine) == {"notes.txt": b"mine"}
    out = tmp_path / "merged"
    assert cli.main(["merge", str(run), "--output", str(out)]) == 0
    (out / "model.safetensors").write_bytes(b"stale")  # an older merge
    assert cli.main(["merge", str(run), "--output", str(out)]) == 2
    assert f"merge --output {out} is not empty; pass --overwrite" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == b"stale"
    (tmp_path / ".merged.tmp-4242").mkdir()  # a merge killed while writing
    assert cli.main(["merge", str(run), "--output", str(out), "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != b"stale"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged", "mine"]  # no .tmp-/.old- sibling left
