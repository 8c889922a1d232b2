"""One config key apart: the demo config trains with every method; checkpointing traps; merge; targets."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from slimtune import cli, config, methods
from slimtune.data import encode_examples
from slimtune.data.collate import collate, pad_id
from slimtune.data.readers import from_alpaca
from slimtune.engine.loop import accumulate
from slimtune.engine.recompute import enable_checkpointing

DEMO = Path(cli.__file__).with_name("demo.yaml")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"instruction": f"Say something about {w}.", "output": f"Here is {w}."} for w in ("a", "b", "c", "d")] * 3
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.mark.parametrize("name", config.METHODS)
def test_demo_config_switches_method_by_name_alone(name, tmp_path, tiny_model_dir, data_file, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on the CPU CI machine
    argv = ["train", str(DEMO), f"method.name={name}", f"model.path={tiny_model_dir}", f"data.train={data_file}",
            f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "data.eval_size=2", "--no-progress"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    if name == "qlora":
        assert code == 2 and "needs a CUDA GPU" in err
    elif name == "bitfit":  # the tiny Llama (like SmolLM2) has no biases
        assert code == 2 and "has none" in err
    else:
        assert code == 0, err
        saved = {p.name for p in (tmp_path / "run").iterdir()}
        artifact = "slimtune_parts.safetensors" if name in ("full", "freeze") else "adapter_model.safetensors"
        assert {artifact, "config.yaml", "metrics.jsonl"} <= saved


def _model_and_batch(model_dir, tokenizer, name):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    exs = [from_alpaca({"instruction": f"Q{i} about it", "output": f"Answer {i} is here"}, str(i)) for i in range(4)]
    batch = collate(encode_examples(exs, tokenizer, config.DataConfig(max_len=64))[0], pad_id(tokenizer))
    return model, batch, config.MethodConfig(name=name, r=4, dropout=0.0, num_virtual_tokens=4)


@pytest.mark.parametrize("name", ["lora", "prefix_tuning", "prompt_tuning", "ia3", "freeze"])
def test_gradient_checkpointing_gives_the_same_gradients(name, tiny_model_dir, tokenizer):
    """Frozen embeddings + checkpointing, and prefix tuning + checkpointing: trained, not crashed, and the
    gradients are those of the run without checkpointing."""
    grads = []
    for ckpt in (False, True):
        model, batch, mcfg = _model_and_batch(tiny_model_dir, tokenizer, name)
        if ckpt:
            assert enable_checkpointing(model, mcfg, log=lambda msg: None) == (name != "prefix_tuning")
        model = methods.apply(model, mcfg)
        model.train()
        accumulate(model, [batch])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "freeze", "full"])
def test_merge_writes_a_plain_model_with_the_same_logits(name, tmp_path, tiny_model_dir, data_file):
    from transformers import AutoModelForCausalLM

    from slimtune.trained import load_run

    run = tmp_path / "run"
    assert cli.main(["train", str(DEMO), f"method.name={name}", f"model.path={tiny_model_dir}",
                     f"data.train={data_file}", f"train.output_dir={run}", "train.max_steps=3", "train.lr=1e-2",
                     "data.eval_size=2", "method.dropout=0", "--no-progress"]) == 0
    assert cli.main(["merge", str(run), "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    trained, tok, _ = load_run(run)
    ids = torch.tensor([tok("Say something about a and b.")["input_ids"]])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert (merged(input_ids=ids).logits - trained(input_ids=ids).logits).abs().max() <= 1e-5
        assert (merged(input_ids=ids).logits - base(input_ids=ids).logits).abs().max() > 1e-4  # training shows


def test_merge_refuses_prompt_methods(tmp_path, tiny_model_dir, data_file, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", str(DEMO), "method.name=prompt_tuning", f"model.path={tiny_model_dir}",
                     f"data.train={data_file}", f"train.output_dir={run}", "train.max_steps=1",
                     "data.eval_size=2", "--no-progress"]) == 0
    assert cli.main(["merge", str(run), "--output", str(tmp_path / "m")]) == 2
    assert "no weights to merge" in capsys.readouterr().err


def test_targets_lists_linear_and_conv1d_modules(tmp_path, capsys):
    from transformers import AutoConfig

    AutoConfig.for_model("gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=100).save_pretrained(tmp_path)
    assert cli.main(["targets", str(tmp_path)]) == 0  # config.json alone: no weights exist
    out = capsys.readouterr().out.splitlines()
    assert "c_attn      3  64->192" in out and "c_fc        3  64->256" in out
    assert "c_proj      6  256->64, 64->64" in out
    assert "all-linear = c_attn, c_fc, c_proj" in out
    assert "default (method.target_modules: []) = c_attn" in out


def test_params_command_from_config_json_alone(tmp_path, capsys, tiny_model_dir):
    from transformers import AutoConfig

    AutoConfig.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)  # no weights in this folder
    assert cli.main(["params", f"model.path={tmp_path}", "method.name=lora", "method.r=4"]) == 0
    from transformers import AutoModelForCausalLM

    real = methods.count_parameters(methods.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                                  config.MethodConfig(r=4)))
    assert capsys.readouterr().out.strip() == (
        f"method lora: trainable params: {real[0]:,} || all params: {real[1]:,} || "
        f"trainable%: {100 * real[0] / real[1]:.4f}")


def test_lora_options_reach_peft(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    cfg = replace(config.MethodConfig(), name="rslora", r=4, alpha=8, bias="all", target_modules=["re:.*q_proj"])
    model = methods.apply(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg)
    pc = model.peft_config["default"]
    assert pc.use_rslora and pc.bias == "all" and pc.target_modules == ".*q_proj"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4 ** 0.5)  # rsLoRA: alpha / sqrt(r)
    assert json.loads(json.dumps(pc.to_dict(), default=str))["peft_type"] == "LORA"
