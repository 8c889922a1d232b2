"""The public API (slimtune/__init__.py) on any nn.Module: every method on a tiny BERT and on a plain
nn.Sequential trains and saves, or refuses saying why; the frozen-head warning; prepare, fit, save, load,
train; and the bench scripts and examples import no private helper."""
from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import slimtune
from slimtune import config

ROOT = Path(__file__).resolve().parents[1]
PEFT = ("lora", "dora", "rslora", "pissa", "ia3")
PROMPT = ("prompt_tuning", "p_tuning", "prefix_tuning")


def _sequential(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0))


class Wrapper(nn.Module):
    """A user's module around a pretrained encoder, with two new heads."""

    def __init__(self, bert):
        super().__init__()
        self.bert, self.linear_1, self.linear_2 = bert, nn.Linear(32, 1), nn.Linear(32, 1)

    def forward(self, input_ids):
        x = self.bert(input_ids=input_ids).last_hidden_state
        return self.linear_1(x).squeeze(-1) + self.linear_2(x).squeeze(-1)


def _cfg(steps: int = 4, lr: float = 1e-2):
    return slimtune.load_config(overrides=[f"train.max_steps={steps}", f"train.lr={lr}", "train.scheduler=constant",
                                           "train.seed=0"])


# method fields per model kind: the Sequential has no architecture default, so it names its modules
FIELDS = {
    "seq": {"ia3": dict(target_modules=["0", "2"], feedforward_modules=["2"]),
            "freeze": dict(trainable_pattern=r"^2\.")},
    "bert": {"freeze": dict(trainable_layers=1)},
}
SEQ_LORA = dict(target_modules=["0", "2"], r=2, alpha=4, dropout=0.0)


def _kind(kind: str):
    """(model builder, dict batches, loss_fn, forward) for one model kind."""
    g = torch.Generator().manual_seed(0)
    if kind == "seq":
        data = [{"x": torch.randn(8, 8, generator=g), "y": torch.randn(8, 4, generator=g)} for _ in range(2)]
        return _sequential, data, lambda m, b: nn.functional.mse_loss(m(b["x"]), b["y"]), lambda m, b: m(b["x"])
    data = [{"input_ids": torch.randint(0, 64, (4, 12), generator=g), "y": torch.randn(4, 32, generator=g)}
            for _ in range(2)]
    fwd = lambda m, b: m(input_ids=b["input_ids"]).last_hidden_state[:, 0]  # noqa: E731
    return _bert, data, lambda m, b: nn.functional.mse_loss(fwd(m, b), b["y"]), fwd


def _fields(kind: str, name: str) -> dict:
    if kind == "seq" and name in ("lora", "dora", "rslora", "pissa"):
        return SEQ_LORA
    return dict(FIELDS[kind].get(name, {}), **({"r": 2, "alpha": 4} if name in PEFT[:4] else {}))


@pytest.mark.parametrize("kind", ["seq", "bert"])
@pytest.mark.parametrize("name", [m for m in config.METHODS if m not in PROMPT + ("qlora",)])
def test_every_method_trains_and_saves_on_any_module(kind, name, tmp_path):
    build, data, loss_fn, fwd = _kind(kind)
    model = slimtune.apply_method(build(), name, **_fields(kind, name))
    trainable, total = slimtune.count_parameters(model)
    assert 0 < trainable <= total
    before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    result = slimtune.fit(model, data, _cfg(), loss_fn=loss_fn, log=lambda *a: None)
    losses = result["losses"]
    assert result["steps"] == 4 and losses[2] < losses[0]  # the first batch again, two updates later
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)  # frozen stays
    slimtune.save(model, tmp_path)
    reloaded = slimtune.load(tmp_path, build())  # a fresh base, the same seed: the artifact brings the rest
    model.eval()
    with torch.no_grad():
        ours, got = fwd(model, data[0]), fwd(reloaded, data[0])
    # PiSSA is saved converted to a rank-2r LoRA of the original weights: equal up to fp32 rounding
    tol = 1e-5 * max(1.0, float(ours.abs().max())) if name == "pissa" else 1e-5
    assert float((ours - got).abs().max()) <= tol


@pytest.mark.parametrize("kind", ["seq", "bert"])
@pytest.mark.parametrize("name", PROMPT)
def test_prompt_methods_refuse_a_model_that_is_not_a_causal_lm(kind, name):
    build = _sequential if kind == "seq" else _bert
    with pytest.raises(slimtune.MethodError, match=rf"method {name} needs a transformers causal LM: .* and "
                                                   rf"{'Sequential' if kind == 'seq' else 'BertModel'} is not one"):
        slimtune.apply_method(build(), name)


def test_qlora_refuses_a_base_that_was_not_quantized_while_loading():
    with pytest.raises(slimtune.MethodError, match="quantized while loading .* weights are not quantized"):
        slimtune.apply_method(_sequential(), "qlora", target_modules=["0"])


def test_no_architecture_default_lists_the_module_names():
    with pytest.raises(slimtune.MethodError, match=r"no default for Sequential \(it has no transformers config.*"
                                                   r"available: 0 \(x1\), 2 \(x1\)"):
        slimtune.apply_method(_sequential(), "lora")
    with pytest.raises(slimtune.MethodError, match="query2 match no Linear module; available: .*query"):
        slimtune.apply_method(_bert(), "lora", target_modules=["query2"])


def test_freeze_without_a_layer_list_says_what_to_set():
    with pytest.raises(slimtune.MethodError, match="set method.trainable_pattern"):
        slimtune.apply_method(_sequential(), "freeze")


def test_ia3_feedforward_modules_must_be_targets():
    with pytest.raises(slimtune.MethodError, match=r"method.feedforward_modules: 1 not among .*add them there"):
        slimtune.apply_method(_sequential(), "ia3", target_modules=["0", "2"], feedforward_modules=["1"])


def test_a_wrapper_takes_the_defaults_of_the_model_inside_it():
    model = slimtune.apply_method(Wrapper(_bert()), "lora", modules_to_save=["linear_1", "linear_2"])
    lora = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, p in model.named_parameters() if "lora_" in n}
    assert lora == {"query", "value"}  # peft's default for bert
    assert model.peft_config["default"].task_type is None  # a plain PeftModel: forward passes arguments through


def test_method_fields_are_checked_as_the_config_checks_them():
    with pytest.raises(slimtune.ConfigError, match=r"apply_method: method.rr: unknown key \(did you mean method.r\?\)"):
        slimtune.apply_method(_sequential(), "lora", rr=4)
    with pytest.raises(slimtune.ConfigError, match="apply_method: method.r: must be at least 1"):
        slimtune.apply_method(_sequential(), "lora", r=0, target_modules=["0"])
    with pytest.raises(slimtune.ConfigError, match="method.name: 'lorax' is not one of"):
        slimtune.apply_method(_sequential(), "lorax")


# --- the frozen-head warning ---

def test_frozen_new_heads_are_warned_about_and_trained_in_modules_to_save():
    with pytest.warns(slimtune.FrozenModuleWarning, match=r"^linear_1, linear_2: not part of the pretrained model, "
                      r"yet method lora leaves them frozen, .* modules_to_save=\['linear_1', 'linear_2'\]"):
        frozen = slimtune.apply_method(Wrapper(_bert()), "lora", target_modules=["query", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", slimtune.FrozenModuleWarning)
        saved = slimtune.apply_method(Wrapper(_bert()), "lora", target_modules=["query", "value"],
                                      modules_to_save=["linear_1", "linear_2"])
    heads = 2 * (32 + 1)
    assert slimtune.count_parameters(saved)[0] == slimtune.count_parameters(frozen)[0] + heads
    assert slimtune.count_parameters(saved)[1] == slimtune.count_parameters(frozen)[1] + heads  # peft's copies


@pytest.mark.parametrize("wrap", [nn.DataParallel, torch.compile], ids=["DataParallel", "torch.compile"])
def test_heads_inside_a_parallel_or_compiled_wrapper_are_warned_about_too(wrap):
    # seed 001 wrapped the span model in nn.DataParallel: the wrapper's one child holds BERT, so its heads
    # passed for pretrained and stayed frozen without a word
    prefix = "module." if wrap is nn.DataParallel else "_orig_mod."
    heads = [f"{prefix}linear_1", f"{prefix}linear_2"]
    with pytest.warns(slimtune.FrozenModuleWarning, match=rf"^{re.escape(', '.join(heads))}: not part of the "
                      rf"pretrained model, yet method lora leaves them frozen, .* "
                      rf"modules_to_save={re.escape(repr(heads))}"):
        frozen = slimtune.apply_method(wrap(Wrapper(_bert())), "lora", target_modules=["query", "value"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", slimtune.FrozenModuleWarning)
        saved = slimtune.apply_method(wrap(Wrapper(_bert())), "lora", target_modules=["query", "value"],
                                      modules_to_save=heads)  # the warning's own fix works as written
    assert slimtune.count_parameters(saved)[0] == slimtune.count_parameters(frozen)[0] + 2 * (32 + 1)


def test_a_named_head_is_checked_too_and_an_unknown_name_is_an_error():
    with pytest.warns(slimtune.FrozenModuleWarning, match="^2: .* leaves it frozen, so it keeps its"):
        slimtune.apply_method(_sequential(), "lora", target_modules=["0"], heads=["2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", slimtune.FrozenModuleWarning)
        slimtune.apply_method(_sequential(), "lora", target_modules=["0"], heads=["2"], modules_to_save=["2"])
        slimtune.apply_method(_sequential(), "full", heads=["2"])
        slimtune.apply_method(_bert(), "lora")  # a transformers model alone: every module is pretrained
    with pytest.raises(slimtune.MethodError, match="heads: 'head' is not a module of Sequential; its direct "
                                                   "submodules: 0, 1, 2"):
        slimtune.apply_method(_sequential(), "lora", target_modules=["0"], heads=["head"])


def test_freeze_names_its_own_fix():
    with pytest.warns(slimtune.FrozenModuleWarning, match=r"method.trainable_pattern \(e.g. '\^\(linear_1\|linear_2\)"):
        slimtune.apply_method(Wrapper(_bert()), "freeze", trainable_layers=1)


# --- prepare, fit, save, load, train ---

def test_prepare_runs_trains_sequence_and_reports_it():
    from conftest import make_model

    lines = []
    cfg = slimtune.load_config(overrides=["method.target_modules=q_proj,v_proj", "method.r=4",
                                          "train.gradient_checkpointing=true", "train.precision=fp32"])
    prep = slimtune.prepare(make_model(100), cfg, "cpu", log=lines.append)
    trainable, total = slimtune.count_parameters(prep.model)
    assert lines == [f"method lora: trainable params: {trainable:,} || all params: {total:,} || "
                     f"trainable%: {100 * trainable / total:.4f}"]
    assert prep.dtypes.name == "fp32" and prep.kernels is None
    assert prep.model.get_base_model().is_activation_checkpointing
    took = slimtune.prepare(make_model(100), cfg, "cpu", log=lambda *a: None, kernels=True).kernels
    assert took["packing"] == "off" and took["fused_lora_layers"] == 0  # auto: off on the CPU


def test_prepare_checkpoints_a_wrapped_encoder_and_refuses_a_module_without_one():
    cfg = slimtune.load_config(overrides=["train.gradient_checkpointing=true",
                                          "method.modules_to_save=linear_1,linear_2"])
    prep = slimtune.prepare(Wrapper(_bert()), cfg, "cpu", log=lambda *a: None)
    assert prep.model.get_base_model().bert.is_activation_checkpointing
    cfg = slimtune.load_config(overrides=["train.gradient_checkpointing=true", "method.target_modules=0"])
    with pytest.raises(slimtune.ConfigError, match="train.gradient_checkpointing: Sequential holds no transformers "
                                                   "model.*set it to false"):
        slimtune.prepare(_sequential(), cfg, "cpu", log=lambda *a: None)


def test_fit_without_loss_fn_needs_a_causal_lm_and_loss_fn_a_scalar():
    model = slimtune.apply_method(_bert(), "lora")
    with pytest.raises(slimtune.MethodError, match="BertModel is not a transformers causal LM.*pass loss_fn"):
        slimtune.fit(model, [], _cfg())
    from conftest import make_model

    from slimtune.data.readers import DataError

    with pytest.raises(DataError, match="fit: data holds dict items; without loss_fn it takes encoded records"):
        slimtune.fit(slimtune.apply_method(make_model(100), "lora"), [{"x": 1}], _cfg())

    with pytest.raises(DataError, match=r"step 1: loss_fn returned Tensor of shape \(8, 4\); it must return"):
        slimtune.fit(slimtune.apply_method(_sequential(), "full"), [{"x": torch.ones(8, 8)}], _cfg(),
                     loss_fn=lambda m, b: m(b["x"]), log=lambda *a: None)
    model = slimtune.apply_method(_sequential(), "full")
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(slimtune.PrecisionError, match="fit: step 1: the loss is not finite .* nothing was updated"):
        slimtune.fit(model, [{"x": torch.ones(8, 8)}], _cfg(), loss_fn=lambda m, b: m(b["x"]).sum() * float("nan"),
                     log=lambda *a: None)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))


def test_a_causal_lm_trains_saves_and_loads_by_the_api(tiny_model_dir, tokenizer, tmp_path):
    from conftest import WORDS
    from transformers import AutoModelForCausalLM

    from slimtune.data import encode_examples
    from slimtune.data.collate import pad_id
    from slimtune.data.readers import from_alpaca

    cfg = slimtune.load_config(overrides=[f"model.path={tiny_model_dir}", "method.target_modules=q_proj,v_proj",
                                          "method.r=4", "train.max_steps=3", "train.lr=1e-2", "train.precision=fp32",
                                          "train.save_every=0", f"train.output_dir={tmp_path / 'run'}"])
    records, _ = encode_examples([from_alpaca({"instruction": f"About {w}.", "output": f"{w} is nice."}, w)
                                  for w in WORDS], tokenizer, cfg.data)
    model = slimtune.prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg, log=lambda *a: None).model
    result = slimtune.fit(model, records, cfg, pad_id=pad_id(tokenizer), log=lambda *a: None)
    assert result["steps"] == 3 and (tmp_path / "run" / "metrics.jsonl").is_file()
    slimtune.save(model, tmp_path / "out", cfg)
    reloaded = slimtune.load(tmp_path / "out")  # the base from config.yaml's model.path
    ids = torch.tensor([records[0].input_ids])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="neither adapter_config.json nor slimtune_parts"):
        slimtune.load(tmp_path / "run", _sequential())


def test_fit_turns_on_the_checkpointing_an_auto_split_chose_after_prepare(tiny_model_dir, tokenizer, tmp_path,
                                                                          monkeypatch):
    """prepare + fit with an auto split: on a GPU the split (resolved in fit) picks checkpointing with the layer
    inputs offloaded; prepare ran before, with checkpointing off, so the offload hooks moved every saved
    activation (issue 28: 2.3x slower at 8B). Here the GPU's choice is planted on the CPU."""
    from conftest import WORDS
    from transformers import AutoModelForCausalLM

    from slimtune.data import encode_examples
    from slimtune.data.readers import from_alpaca
    from slimtune.engine.recompute import checkpointing_on

    cfg = slimtune.load_config(overrides=[f"model.path={tiny_model_dir}", "method.target_modules=q_proj,v_proj",
                                          "method.r=4", "train.max_steps=2", "train.batch_size=4", "train.seed=1",
                                          "train.precision=fp32", "train.save_every=0",
                                          f"train.output_dir={tmp_path / 'run'}"])
    records, _ = encode_examples([from_alpaca({"instruction": f"About {w}.", "output": f"{w} is nice."}, w)
                                  for w in WORDS], tokenizer, cfg.data)
    model = slimtune.prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), cfg, log=lambda *a: None).model
    assert not checkpointing_on(model)  # batch_size alone: the split, and so checkpointing, is fit's to choose

    from slimtune.engine import split

    def gpu_choice(cfg, device, *args, **kw):
        return split.Split(4, split.Option(4, 1, True, True), "planted")
    monkeypatch.setattr(split, "split", gpu_choice)
    import transformers.modeling_utils as mu
    calls, real = [], mu.checkpoint  # what transformers' layers call once checkpointing is on
    monkeypatch.setattr(mu, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    lines = []
    slimtune.fit(model, records, cfg, log=lines.append)
    assert checkpointing_on(model)
    assert len(calls) >= 2 * 2  # two layers checkpointed in each of the 2 steps' forwards
    assert "gradient checkpointing on: the batch split chose it (prepare ran before the split was known)" in lines


def test_train_is_what_the_cli_runs(tiny_model_dir, tmp_path):
    from conftest import lora_run_config

    from slimtune import train

    cfg = slimtune.load_config(lora_run_config(tmp_path, tiny_model_dir, "run", max_steps=2))
    result = slimtune.train(cfg, show_progress=False, log=lambda *a: None)
    assert result["steps"] == 2 and (tmp_path / "run" / "adapter_config.json").is_file()
    assert callable(train.from_config) and slimtune.train is train  # still the module, as tests import it


def test_the_api_doc_examples_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    from conftest import lora_run_config

    section = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if b.startswith(("import", "from"))]
    assert len(blocks) == 2
    lora_run_config(tmp_path, tiny_model_dir, "run")  # run.yaml, as the second example reads
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), {})
    out = capsys.readouterr().out
    assert "trainable params: 176 || all params: 388 || trainable%: 45.3608" in out  # as docs/api.md says
    assert (tmp_path / "runs" / "seq-lora" / "adapter_config.json").is_file()
    assert (tmp_path / "run" / "adapter_config.json").is_file()


# --- the package stays light, the scripts use the API ---

def test_import_slimtune_loads_no_heavy_package():
    code = "import slimtune, sys; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    assert set(slimtune.__all__) <= set(dir(slimtune))


PRIVATE = re.compile(r"from slimtune[\w.]* import [^\n#]*\b_[a-z]\w*|slimtune\.\w+(\.\w+)*\._[a-z]\w*|"
                     r"\b(loop|train|train_mod)\._[a-z]\w*")


def test_bench_scripts_examples_and_demo_use_no_private_helper():
    files = [*ROOT.glob("bench/*.py"), *ROOT.glob("examples/*.py"), ROOT / "slimtune" / "demo.py"]
    found = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in files for m in PRIVATE.finditer(f.read_text())]
    assert found == []
    retyped = [f.name for f in ROOT.glob("bench/*.py") if "methods.apply(" in f.read_text()]
    assert retyped == []  # the preparation sequence is slimtune.prepare (or apply_method)
