"""The training path on a tiny random Llama: cli train -> files -> reload -> generate / chat."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import write_jsonl
from slimtune import cli, config
from slimtune.data.collate import collate, pad_id
from slimtune.runs.metrics_log import read_metrics
from slimtune.engine.loop import accumulate
from slimtune.engine.loss import token_loss_sum
from slimtune.engine.optim import lr_factor


def _config(tmp_path: Path, model_dir: Path, rows: list, **train) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    tree = {
        "model": {"path": str(model_dir)},
        "data": {"train": str(data), "eval_size": 8, "max_len": 64},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 20, "micro_batch_size": 4, "lr": 1e-2,
                  "warmup_steps": 0, "scheduler": "constant", **train},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """One training run shared by the checks below."""
    tmp = tmp_path_factory.mktemp("train")
    words = ["Paris", "blue", "seven", "the fox", "healthy food", "water", "sleep", "a dog"]
    rows = [{"instruction": f"Say something about {w}.", "input": "", "output": f"Here is {w}. {w} is nice."}
            for w in words for _ in range(4)]
    cfg_path = _config(tmp, tiny_model_dir, rows)
    assert cli.main(["train", str(cfg_path), "--no-progress"]) == 0
    return tmp / "run", cfg_path


def test_run_folder_holds_peft_adapter_config_and_metrics(trained):
    run, _ = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), name
    adapter = json.loads((run / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["r"] == 4
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    weights = load_file(run / "adapter_model.safetensors")
    assert len(weights) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    assert config.load(run / "config.yaml").train.max_steps == 20


def test_eval_loss_falls_and_train_loss_drops(trained):
    rows = read_metrics(trained[0] / "metrics.jsonl")
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(evals) == 2 and len(losses) == 20
    assert evals[1] < 0.75 * evals[0]  # memorisable data, lr 1e-2: the held-out loss falls by > 25%
    assert sum(losses[-3:]) / 3 < 0.75 * sum(losses[:3]) / 3
    assert all(r["input_tokens_per_s"] > r["trained_tokens_per_s"] > 0 and r["lr"] == pytest.approx(1e-2)
               for r in rows if "loss" in r)


def test_peft_loads_adapter_with_same_logits_and_base_untouched(trained, tiny_model_dir, tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from slimtune.trained import load_run

    ours, _, _ = load_run(trained[0])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    plain = PeftModel.from_pretrained(base, trained[0]).eval()
    ids = torch.tensor([tokenizer("Say something about Paris.")["input_ids"]])
    with torch.no_grad():
        diff = (plain(input_ids=ids).logits - ours(input_ids=ids).logits).abs().max()
    assert float(diff) <= 1e-5
    fresh = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    tuned = {n.replace(".base_layer", ""): p for n, p in plain.get_base_model().named_parameters() if "lora_" not in n}
    assert tuned.keys() == fresh.keys()
    for name, p in fresh.items():
        assert torch.equal(p, tuned[name]), name  # frozen base weights are bit-identical
    # the adapter changed the output: LoRA B is no longer zero
    base_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - base_model(input_ids=ids).logits).abs().max() > 1e-3


def test_generate_writes_one_prediction_per_prompt(trained, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"instruction": "Say something about Paris.", "id": 7},
        {"messages": [{"role": "user", "content": "Say something about blue."}]},
        {"instruction": "Say something about a dog.", "input": "", "output": "reference kept"},
    ])
    out = tmp_path / "out.jsonl"
    assert cli.main(["generate", str(trained[0]), "--input", str(prompts), "--output", str(out),
                     "--max-new-tokens", "12", "--device", "cpu"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and rows[0]["id"] == 7 and rows[2]["output"] == "reference kept"
    assert all(isinstance(r["prediction"], str) and r["prediction"] for r in rows)


def test_batched_greedy_equals_one_by_one(trained):
    from slimtune.evaluate.generate import generate
    from slimtune.trained import load_run

    model, tok, cfg = load_run(trained[0])
    convs = [[{"role": "user", "content": q}] for q in
             ("Say something about Paris.", "Hi", "Say something about the quick brown fox today, please.")]
    batched = generate(model, tok, cfg.data.template, convs, 10, batch_size=3)
    single = [generate(model, tok, cfg.data.template, [c], 10, batch_size=1)[0] for c in convs]
    assert batched == single


def test_chat_keeps_history(trained, monkeypatch, capsys):
    lines = iter(["Say something about Paris.", "/reset", "Say something about blue.", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", str(trained[0]), "--max-new-tokens", "8", "--device", "cpu"]) == 0
    answers = [x for x in capsys.readouterr().out.splitlines() if x.startswith("assistant> ")]
    assert len(answers) == 2


def test_output_dir_with_another_run_is_refused(trained, capsys):
    _, cfg_path = trained
    assert cli.main(["train", str(cfg_path), "--no-progress"]) == 2
    assert "already holds files" in capsys.readouterr().err


def test_target_modules_that_match_nothing_list_the_available(tmp_path, tiny_model_dir, capsys):
    cfg = _config(tmp_path, tiny_model_dir, [{"instruction": "a", "output": "b"}] * 4)
    assert cli.main(["train", str(cfg), "method.target_modules=qkv_proj", "data.eval_size=1"]) == 2
    err = capsys.readouterr().err
    assert "qkv_proj" in err and "q_proj (x2)" in err and "down_proj (x2)" in err


def test_regex_targets(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from slimtune.methods import targets

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    pattern = ".*layers\\.1\\.self_attn\\.(q|k)_proj"
    assert targets.resolve(model, ["re:" + pattern]) == pattern
    assert targets.resolve(model, ["all-linear"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with pytest.raises(targets.TargetError, match="matches no Linear"):
        targets.resolve(model, ["re:nothing"])


def _lora_model(model_dir, seed=0):
    from transformers import AutoModelForCausalLM

    from slimtune import methods

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return methods.apply(model, config.MethodConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))


def _records(tokenizer, n=8):
    from slimtune.data import encode_examples
    from slimtune.data.readers import from_alpaca

    exs = [from_alpaca({"instruction": "Tell me " + "about it " * (i + 1), "output": f"Answer {i} " * (i + 1)},
                       f"r{i}") for i in range(n)]
    return encode_examples(exs, tokenizer, config.DataConfig(max_len=128))[0]


def test_gradient_accumulation_equals_one_big_batch(tiny_model_dir, tokenizer):
    """4 + 4 accumulated equals 8 at once: each step's loss is the mean over all its answer tokens."""
    recs, pad = _records(tokenizer), pad_id(tokenizer)
    grads, losses = [], []
    for chunks in ([recs], [recs[:3], recs[3:]]):  # uneven token counts per micro-batch
        model = _lora_model(tiny_model_dir)
        loss, _ = accumulate(model, [collate(c, pad) for c in chunks])
        losses.append(loss)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert grads[0].abs().max() > 0


def test_head_on_answer_positions_equals_full_logits_loss(tiny_model_dir, tokenizer, monkeypatch):
    import slimtune.engine.loss as loss_mod

    model = _lora_model(tiny_model_dir)
    batch = collate(_records(tokenizer), pad_id(tokenizer))
    fast, n_fast = token_loss_sum(model, batch)
    monkeypatch.setattr(loss_mod, "split_head", lambda m: None)
    full, n_full = token_loss_sum(model, batch)
    assert n_fast == n_full > 0
    assert fast.item() == pytest.approx(full.item(), rel=1e-5)


def test_lr_schedule_values():
    assert lr_factor(0, 10, 2, "cosine") == pytest.approx(1 / 3)
    assert lr_factor(1, 10, 2, "cosine") == pytest.approx(2 / 3)
    assert lr_factor(2, 10, 2, "cosine") == pytest.approx(1.0)
    assert lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(6, 10, 2, "linear") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "linear") == pytest.approx(0.1)
    assert lr_factor(9, 10, 0, "constant") == 1.0
