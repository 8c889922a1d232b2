"""Config: YAML fills the typed tree, dotted overrides convert by declared type, every problem is reported once."""
from __future__ import annotations

import dataclasses
import json
import typing

import pytest
import yaml

from slimtune import cli, config
from slimtune.config import Config, ConfigError
from slimtune.engine import run_plan, split

YAML = """\
model:
  path: some/model
  dtype: bf16
data:
  train: train.jsonl
  template: chatml
  max_len: 256
method:
  r: 16
  alpha: 32
  target_modules: [q_proj, k_proj, v_proj]
train:
  lr: 1e-4
  max_steps: 10
  scheduler: linear
  eval_at_start: false
"""


def write(tmp_path, text: str, name: str = "cfg.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems(err: pytest.ExceptionInfo) -> list[str]:
    return str(err.value).splitlines()


def test_yaml_fills_nested_sections(tmp_path):
    cfg = config.load(write(tmp_path, YAML))
    assert cfg.model.path == "some/model" and cfg.model.dtype == "bf16"
    assert cfg.data.train == "train.jsonl" and cfg.data.template == "chatml" and cfg.data.max_len == 256
    assert cfg.method.r == 16
    # YAML 1.1 reads "32" as int and "1e-4" as a string: both become the declared float
    assert cfg.method.alpha == 32.0 and type(cfg.method.alpha) is float
    assert cfg.train.lr == 1e-4 and type(cfg.train.lr) is float
    assert cfg.method.target_modules == ["q_proj", "k_proj", "v_proj"]
    assert cfg.train.max_steps == 10 and cfg.train.scheduler == "linear" and cfg.train.eval_at_start is False
    # untouched fields keep their defaults
    assert cfg.train.micro_batch_size == "auto" and cfg.data.format == "auto" and cfg.model.trust_remote_code is False


def test_no_file_gives_defaults():
    assert config.load(None, []) == Config()


def test_overrides_convert_by_declared_type(tmp_path):
    cfg = config.load(write(tmp_path, YAML), ["train.lr=2e-4", "train.max_steps=5", "data.train_on_prompt=true",
                                              "method.target_modules=q_proj,v_proj", "method.alpha=8",
                                              "model.path=123"])
    assert cfg.train.lr == 2e-4 and type(cfg.train.lr) is float
    assert cfg.train.max_steps == 5 and type(cfg.train.max_steps) is int
    assert cfg.data.train_on_prompt is True
    assert cfg.method.target_modules == ["q_proj", "v_proj"]
    assert all(type(x) is str for x in cfg.method.target_modules)
    assert cfg.method.alpha == 8.0 and type(cfg.method.alpha) is float  # declared float, not guessed int
    assert cfg.model.path == "123" and type(cfg.model.path) is str  # declared str, not guessed int


@pytest.mark.parametrize("text, expected", [
    ("q_proj,v_proj", ["q_proj", "v_proj"]),
    ("[q_proj, v_proj]", ["q_proj", "v_proj"]),
    (" q_proj , v_proj ,", ["q_proj", "v_proj"]),
    ("re:.*proj", ["re:.*proj"]),
])
def test_list_override_forms(text, expected):
    assert config.load(None, [f"method.target_modules={text}"]).method.target_modules == expected


@pytest.mark.parametrize("text, value", [("true", True), ("1", True), ("yes", True), ("False", False),
                                         ("0", False), ("off", False)])
def test_bool_override_words(text, value):
    assert config.load(None, [f"data.train_on_prompt={text}"]).data.train_on_prompt is value


@pytest.mark.parametrize("item, line", [
    ("train.max_steps=abc", "override train.max_steps: expected an integer, got 'abc'"),
    ("train.max_steps=2.5", "override train.max_steps: expected an integer, got '2.5'"),
    ("train.lr=fast", "override train.lr: expected a number, got 'fast'"),
    ("data.train_on_prompt=maybe", "override data.train_on_prompt: expected true or false, got 'maybe'"),
    ("method.target_modules=[q_proj",
     "override method.target_modules: expected a list like a,b or [a, b], got '[q_proj'"),
    ("method.target_modules=[a]b", "override method.target_modules: expected a list like a,b or [a, b], got '[a]b'"),
    ("train.lr", "override 'train.lr': expected section.key=value"),
])
def test_bad_override_value_names_the_key(item, line):
    with pytest.raises(ConfigError) as err:
        config.load(None, [item])
    assert problems(err) == [line]


def test_bad_yaml_value_names_file_and_key(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: abc\n  lr: true\nmethod:\n  target_modules: [1, q_proj]\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert problems(err) == [f"{path}: train.max_steps: expected int, got 'abc'",
                             f"{path}: train.lr: expected float, got True",
                             f"{path}: method.target_modules[0]: expected str, got 1"]


def test_every_unknown_key_listed_at_once_with_suggestions(tmp_path):
    path = write(tmp_path, "train:\n  warmup: 10\n  lr: 1e-4\ndata:\n  max_length: 128\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, ["method.dropuot=0.1", "train.max_steps=3"])
    assert problems(err) == [
        f"{path}: train.warmup: unknown key (did you mean train.warmup_steps?)",
        f"{path}: data.max_length: unknown key (did you mean data.max_len?)",
        "override method.dropuot: unknown key (did you mean method.dropout?)",
    ]


def test_unknown_section_in_yaml_and_override(tmp_path):
    path = write(tmp_path, "trian:\n  lr: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, ["modle.path=x", "train.lr=1e-3"])
    assert problems(err) == [f"{path}: trian: unknown key (did you mean train?)",
                             "override modle.path: unknown key (did you mean model.path?)"]


def test_unknown_key_without_close_match_lists_known_keys():
    with pytest.raises(ConfigError) as err:
        config.load(None, ["model.zzzzzz=1"])
    assert problems(err) == ["override model.zzzzzz: unknown key (known: model.path, model.trust_remote_code, "
                             "model.dtype)"]


@pytest.mark.parametrize("item, line", [
    ("method.name=lora2", "method.name: 'lora2' is not one of lora, dora, rslora, pissa, qlora, full, freeze, "
                          "bitfit, prompt_tuning, p_tuning, prefix_tuning, ia3"),
    ("data.template=alpaca", "data.template: 'alpaca' is not one of auto, llama2, llama3, chatglm3, bloom, chatml, "
                              "gemma3, phi3, phi4, qwen3, qwen3-thinking"),
    ("train.scheduler=step", "train.scheduler: 'step' is not one of cosine, linear, constant"),
    ("model.dtype=fp8", "model.dtype: 'fp8' is not one of auto, fp32, bf16, fp16"),
    ("data.format=csv", "data.format: 'csv' is not one of auto, alpaca, messages, sharegpt"),
    ("train.device=tpu", "train.device: 'tpu' is not one of auto, cpu, cuda"),
])
def test_invalid_choice(item, line):
    with pytest.raises(ConfigError) as err:
        config.load(None, [item])
    assert problems(err) == [line]


@pytest.mark.parametrize("item, line", [
    ("train.lr=0", "train.lr: must be positive"),
    ("train.lr=-1e-4", "train.lr: must be positive"),
    ("train.lr=nan", "train.lr: must be a finite number, got nan"),
    ("train.micro_batch_size=0", "train.micro_batch_size: must be at least 1"),
    ("train.grad_accum=-2", "train.grad_accum: must be at least 1"),
    ("train.log_every=0", "train.log_every: must be at least 1"),
    ("data.max_len=0", "data.max_len: must be at least 1"),
    ("method.r=0", "method.r: must be at least 1"),
    ("train.max_steps=-1", "train.max_steps: must be >= 0 (0 = derived from train.epochs)"),
    ("train.epochs=0", "train.epochs: must be positive (or set train.max_steps)"),
    ("train.warmup_steps=-5", "train.warmup_steps: must be >= 0"),
    ("method.dropout=1", "method.dropout: must be in [0, 1)"),
    ("data.eval_size=-0.5", "data.eval_size: must be >= 0"),
    ("method.quant_bits=3", "method.quant_bits: must be 4 (NF4) or 8"),
])
def test_out_of_range_values(item, line):
    with pytest.raises(ConfigError) as err:
        config.load(None, [item])
    assert problems(err) == [line]


def test_epochs_zero_is_fine_when_max_steps_set():
    cfg = config.load(None, ["train.epochs=0", "train.max_steps=3"])
    assert (cfg.train.epochs, cfg.train.max_steps) == (0.0, 3)


def test_unknown_keys_and_bad_values_reported_together(tmp_path):
    path = write(tmp_path, "train:\n  scheduler: step\n  warmup: 1\n  max_steps: abc\n")
    with pytest.raises(ConfigError) as err:
        config.load(path, ["method.r=0"])
    assert problems(err) == [f"{path}: train.warmup: unknown key (did you mean train.warmup_steps?)",
                             f"{path}: train.max_steps: expected int, got 'abc'",
                             "train.scheduler: 'step' is not one of cosine, linear, constant",
                             "method.r: must be at least 1"]


@pytest.mark.parametrize("text, needle", [
    ("- a\n- b\n", "expected a mapping of sections (model, data, method, train)"),
    ("train: 5\n", "train: expected a mapping, got 5"),
    ("train: [unclosed\n", "invalid YAML"),
])
def test_malformed_yaml(tmp_path, text, needle):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(path) in str(err.value) and needle in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")


def test_empty_sections_and_file_keep_defaults(tmp_path):
    assert config.load(write(tmp_path, "")) == Config()
    assert config.load(write(tmp_path, "model:\ntrain:\n", "b.yaml")) == Config()


def test_dump_loads_back_equal(tmp_path):
    cfg = config.load(write(tmp_path, YAML), ["train.lr=3e-5", "data.train_on_prompt=true", "model.path=true",
                                              "data.system=You are: helpful\nand kind", "data.eval_size=5",
                                              "method.target_modules=re:.*(q|v)_proj"])
    text = config.dump(cfg)
    again = config.load(write(tmp_path, text, "dumped.yaml"))
    assert again == cfg
    assert again.model.path == "true" and again.data.eval_size == 5.0 and again.train.lr == 3e-5
    assert config.dump(again) == text


def test_dump_of_defaults_loads_back_and_lists_every_section(tmp_path):
    text = config.dump(Config())
    assert [line for line in text.splitlines() if not line.startswith(" ")] == ["model:", "data:", "method:",
                                                                                "train:", "preference:", "grpo:"]
    assert config.load(write(tmp_path, text)) == Config()


def test_from_dict_fills_and_rejects_unknown():
    cfg = config.from_dict({"train": {"lr": 0.001, "max_steps": 2}, "method": {"target_modules": "q_proj"}})
    assert cfg.train.lr == 0.001 and cfg.train.max_steps == 2 and cfg.method.target_modules == ["q_proj"]
    with pytest.raises(ConfigError) as err:
        config.from_dict({"train": {"lrr": 1}}, "run/config.yaml")
    assert problems(err) == ["run/config.yaml: train.lrr: unknown key (did you mean train.lr?)"]


# --- through the CLI ---

@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if `train --print-config` gets as far as loading a tokenizer, a model or training."""
    from slimtune import models, train

    def boom(*args, **kwargs):
        raise AssertionError("--print-config must not load a model or train")

    for mod, name in ((train, "from_config"), (models, "load"), (models, "load_tokenizer")):
        monkeypatch.setattr(mod, name, boom)


def test_cli_print_config(tmp_path, capsys, no_training):
    path = write(tmp_path, YAML)
    code = cli.main(["train", str(path), "train.lr=5e-5", "method.target_modules=[q_proj, o_proj]",
                     "--model", "other/model", "--print-config"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    assert "  lr: 5.0e-05\n" in out
    assert "  path: other/model\n" in out
    assert "  target_modules:\n  - q_proj\n  - o_proj\n" in out
    assert "  scheduler: linear\n" in out  # from the YAML
    # what is printed reads back as the config the run trains with: an auto split resolved where it can be
    resolved, _ = split.for_print(config.load(
        path, ["train.lr=5e-5", "method.target_modules=q_proj,o_proj", "model.path=other/model"]))
    assert config.load(write(tmp_path, out, "printed.yaml")) == resolved


def test_cli_print_config_resolves_an_auto_split_on_the_cpu(tmp_path, capsys, no_training, tiny_model_dir):
    """batch_size 16 with the split auto: the CPU's rule gives 8 x 2, printed as numbers with the reason."""
    path = write(tmp_path, f"model:\n  path: {tiny_model_dir}\ntrain:\n  batch_size: 16\n  device: cpu\n")
    assert cli.main(["train", str(path), "--print-config"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    train = yaml.safe_load(out)["train"]
    assert (train["batch_size"], train["micro_batch_size"], train["grad_accum"]) == (16, 8, 2)
    block = out[out.index("\ntrain:\n"):out.index("  batch_size: 16\n")]  # the note sits above the split
    assert "  # train.micro_batch_size and train.grad_accum are auto in the config;" in block
    assert "as 8 x 2 (micro_batch_size x grad_accum); on the CPU" in block.replace("\n  # ", " ")
    printed = config.load(write(tmp_path, out, "printed.yaml"))
    assert (printed.train.micro_batch_size, printed.train.grad_accum) == (8, 2)


@pytest.mark.parametrize("batch, want", [(12, (6, 2)), (7, (7, 1)), (4, (4, 1)), (24, (8, 3))])
def test_print_config_cpu_split_matches_the_run(tmp_path, batch, want):
    """--print-config prints the split train resolves on the CPU (the run plan's), not a guess of its own."""
    cfg = config.load(write(tmp_path, f"train:\n  batch_size: {batch}\n  device: cpu\n"))
    printed, note = split.for_print(cfg)
    run = run_plan.resolve(cfg, "cpu").apply(cfg)
    assert (printed.train.micro_batch_size, printed.train.grad_accum) == want
    assert printed.train == run.train and f"as {want[0]} x {want[1]}" in note


def test_cli_print_config_partial_split_is_derived(tmp_path, capsys, no_training):
    path = write(tmp_path, "train:\n  batch_size: 16\n  grad_accum: 4\n")
    assert cli.main(["train", str(path), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "  batch_size: 16\n  micro_batch_size: 4\n  grad_accum: 4\n" in out
    assert "  # train.micro_batch_size auto in the config: follows from the others" in out


def test_cli_print_config_leaves_a_gpu_split_auto_and_says_why(tmp_path, capsys, no_training, tiny_model_dir):
    """On a GPU the split depends on the memory free when the run starts: auto stays, with one note."""
    path = write(tmp_path, f"model:\n  path: {tiny_model_dir}\ntrain:\n  batch_size: 16\n  device: cuda\n")
    assert cli.main(["train", str(path), "--print-config"]) == 0
    out = capsys.readouterr().out
    train = yaml.safe_load(out)["train"]
    assert (train["batch_size"], train["micro_batch_size"], train["grad_accum"]) == (16, "auto", "auto")
    note = " ".join(line.strip("# ") for line in out.splitlines() if line.startswith("  #"))
    assert "chosen when the run starts" in note and "fits the GPU memory free then, less 10%" in note
    assert "slimtune estimate CONFIG" in note


def test_cli_print_config_stated_split_has_no_note(tmp_path, capsys, no_training):
    path = write(tmp_path, "train:\n  batch_size: 6\n  micro_batch_size: 3\n  grad_accum: 2\n")
    assert cli.main(["train", str(path), "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "#" not in out and "  batch_size: 6\n  micro_batch_size: 3\n  grad_accum: 2\n" in out


def test_cli_print_config_overrides_only(capsys, no_training):
    assert cli.main(["train", "train.max_steps=7", "--print-config"]) == 0
    assert "  max_steps: 7\n" in capsys.readouterr().out


def test_cli_bad_key_exits_2(tmp_path, capsys, no_training):
    path = write(tmp_path, "train:\n  warmup: 3\n")
    code = cli.main(["train", str(path), "train.lr=1e-4", "--print-config"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err == (f"slimtune train: error: {path}: train.warmup: unknown key "
                   "(did you mean train.warmup_steps?)\n")


# --- every numeric key finite and in range (issue 15 item 7) ---

@pytest.mark.parametrize("item, line", [
    ("train.lr=inf", "train.lr: must be a finite number, got inf"),
    ("train.adam_eps=0", "train.adam_eps: must be positive (fp16-pure needs >= 1e-4)"),
    ("train.adam_eps=-1e-8", "train.adam_eps: must be positive (fp16-pure needs >= 1e-4)"),
    ("train.adam_eps=nan", "train.adam_eps: must be a finite number, got nan"),
    ("train.weight_decay=-0.1", "train.weight_decay: must be >= 0"),
    ("train.weight_decay=nan", "train.weight_decay: must be a finite number, got nan"),
    ("train.epochs=inf", "train.epochs: must be a finite number, got inf"),
    ("train.epochs=nan", "train.epochs: must be a finite number, got nan"),
    ("data.eval_size=nan", "data.eval_size: must be a finite number, got nan"),
    ("data.eval_size=inf", "data.eval_size: must be a finite number, got inf"),
    ("data.eval_size=2.5", "data.eval_size: 2.5 is neither a fraction below 1 nor a whole number of records"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: must be >= 0"),
    ("train.max_grad_norm=inf", "train.max_grad_norm: must be a finite number, got inf"),
    ("method.alpha=0", "method.alpha: must be positive"),
    ("method.alpha=-16", "method.alpha: must be positive"),
    ("method.dropout=nan", "method.dropout: must be a finite number, got nan"),
    ("method.encoder_hidden_size=0", "method.encoder_hidden_size: must be at least 1"),
    ("method.layers_to_transform=0,-1", "method.layers_to_transform: must be >= 0"),
    ("data.limit=-1", "data.limit: must be >= 0"),
    ("train.max_skipped_share=1.5", "train.max_skipped_share: must be in [0, 1]"),
    ("train.seed=-1", "train.seed: must be in [0, 2**63)"),
    (f"train.seed={2 ** 64}", "train.seed: an integer of 65 bits is beyond 64-bit integers; must be in [0, 2**63)"),
    (f"data.seed={2 ** 63}", "data.seed: 9223372036854775808 is beyond 64-bit integers; must be in [0, 2**63)"),
    (f"train.max_steps={10 ** 30}", "train.max_steps: an integer of 100 bits is beyond 64-bit integers; must be >= 0 "
                                    "(0 = derived from train.epochs)"),
])
def test_every_bad_number_is_refused_naming_the_key(item, line):
    with pytest.raises(ConfigError) as err:
        config.load(None, [item])
    assert problems(err) == [line]


def test_every_numeric_field_has_a_range():
    numeric = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.type if
               isinstance(s.type, type) else typing.get_type_hints(Config)[s.name]) if typing.get_type_hints(
               typing.get_type_hints(Config)[s.name])[f.name] in (int, float, list[int], int | str)}
    assert numeric == set(config.RANGES)


def test_bad_numbers_in_yaml_too(tmp_path):
    path = write(tmp_path, "train:\n  lr: .inf\n  adam_eps: 0\n  seed: 99999999999999999999999\n"
                           "data:\n  eval_size: .nan\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert problems(err) == ["data.eval_size: must be a finite number, got nan",
                             "train.lr: must be a finite number, got inf",
                             "train.seed: an integer of 77 bits is beyond 64-bit integers; must be in [0, 2**63)",
                             "train.adam_eps: must be positive (fp16-pure needs >= 1e-4)"]


def test_huge_numbers_never_raise_a_python_error(tmp_path):
    digits = "9" * 5000  # str() of such an int raises ValueError in Python >= 3.11
    with pytest.raises(ConfigError) as err:
        config.load(None, [f"train.max_steps={digits}", f"method.layers_to_transform=[{digits}]", f"train.lr={digits}"])
    text = str(err.value)
    assert "train.lr: must be a finite number, got inf" in text
    assert "override train.max_steps: expected an integer, got '99999" in text
    assert "method.layers_to_transform: expected a list like a,b or [a, b]" in text
    assert len(text) < 2000


# --- config problems that raised tracebacks or passed silently (issue 15 item 14) ---

def test_a_duplicate_section_or_key_is_refused_naming_the_line(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-4\nmethod:\n  r: 8\ntrain:\n  max_steps: 3\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert problems(err) == [f"{path} line 5: 'train' is given twice (first on line 1), and YAML would keep only "
                             "the last; remove one"]
    path = write(tmp_path, "train:\n  lr: 1e-4\n  max_steps: 3\n  lr: 2e-4\n", "b.yaml")
    with pytest.raises(ConfigError, match=r"b.yaml line 4: 'lr' is given twice \(first on line 2\)"):
        config.load(path)
    path = write(tmp_path, "train: {lr: 1.0e-4, lr: 2.0e-4}\n", "c.yaml")
    with pytest.raises(ConfigError, match=r"c.yaml line 1: 'lr' is given twice \(first on line 1\)"):
        config.load(path)


def test_yaml_merge_keys_may_reset_keys(tmp_path):
    path = write(tmp_path, "train:\n  <<: {lr: 1.0e-4, max_steps: 3}\n  lr: 2.0e-4\n", "n.yaml")
    assert config.load(path).train.lr == 2e-4


@pytest.mark.parametrize("text", ["train:\n  output_dir: 2001-13-45\n", "train: " + "[" * 2000 + "\n",
                                  "train:\n  seed: " + "1" * 5000 + "\n"])
def test_yaml_the_parser_chokes_on_is_a_config_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"{path}: ")


# --- unknown keys suggested by meaning (issue 16 item 9) ---

@pytest.mark.parametrize("item, meant", [
    ("train.learning_rate=1e-4", "train.lr"), ("train.per_device_train_batch_size=8", "train.micro_batch_size"),
    ("train.num_train_epochs=3", "train.epochs"), ("train.gradient_accumulation_steps=4", "train.grad_accum"),
    ("train.warmup_ratio=0.1", "train.warmup_steps"), ("method.lora_r=8", "method.r"),
    ("method.rank=8", "method.r"), ("method.lora_alpha=16", "method.alpha"),
    ("method.lora_dropout=0", "method.dropout"),
    ("data.cutoff_len=512", "data.max_len"), ("data.max_seq_length=512", "data.max_len"),
    ("data.dataset=x.json", "data.train"), ("model.model_name_or_path=x", "model.path"),
    ("output_dir=runs/a", "train.output_dir"), ("learning_rate=1e-4", "train.lr"), ("train.max_len=64", "data.max_len"),
    ("train.lora_target=q_proj", "method.target_modules"), ("train.logging_steps=5", "train.log_every"),
])
def test_unknown_keys_suggested_by_meaning(item, meant):
    with pytest.raises(ConfigError) as err:
        config.load(None, [item])
    assert str(err.value).endswith(f"unknown key (did you mean {meant}?)")


def test_top_level_keys_of_other_tools_suggested_in_yaml(tmp_path):
    path = write(tmp_path, "output_dir: runs/x\ndataset: a.json\nmodel_name_or_path: m\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert problems(err) == [f"{path}: output_dir: unknown key (did you mean train.output_dir?)",
                             f"{path}: dataset: unknown key (did you mean data.train?)",
                             f"{path}: model_name_or_path: unknown key (did you mean model.path?)"]


def test_every_field_has_a_docstring():
    """The string under each field is its documentation; a field added without one fails here."""
    sections = config.field_docs(Config)
    assert list(sections) == ["model", "data", "method", "train", "preference", "grpo"]
    assert all(doc for _, doc in sections.values())
    for section in sections:
        cls = typing.get_type_hints(Config)[section]
        docs = config.field_docs(cls)
        assert list(docs) == [f.name for f in dataclasses.fields(cls)]
        assert [k for k, (_, doc) in docs.items() if len(doc) < 10] == []
    assert config.field_docs(config.TrainConfig)["eval_separator"] == (
        "str", 'also score answers as item sets split on this ("\\n" = newline; implies eval_generate)')
    assert config.field_docs(config.MethodConfig)["target_modules"][0] == "list[str]"


def test_help_config_lists_every_key(capsys):
    assert cli.main(["train", "--help-config", "no-such.yaml"]) == 0  # help works while a config is broken
    out = capsys.readouterr().out
    lines = out.splitlines()
    for section in config.field_docs(Config):
        cls = typing.get_type_hints(Config)[section]
        for key, (tp, doc) in config.field_docs(cls).items():
            head = next(i for i, line in enumerate(lines) if line.startswith(f"  {section}.{key} ("))
            default = json.dumps(getattr(cls(), key))
            assert lines[head].startswith(f"  {section}.{key} ({tp}, default {default}"), lines[head]
            text = []
            for line in lines[head + 1:]:
                if not line.startswith("      "):
                    break
                text.append(line.strip())
            assert " ".join(text) == doc
    assert "  train.precision (str, default \"auto\"; one of: auto, fp32, bf16, bf16-pure, fp16, fp16-pure)" in lines
    assert "  train.lr (float, default 0.0002; range (0, inf))" in lines
    assert "  method.quant_bits (int, default 4; one of: 4, 8)" in lines
    assert "data: the training and held-out records, their chat template and length" in lines


def test_config_command(tmp_path, capsys):
    assert cli.main(["config", "--explain"]) == 0
    explained = capsys.readouterr().out
    assert cli.main(["train", "--help-config"]) == 0
    assert explained == capsys.readouterr().out
    (tmp_path / "c.yaml").write_text("method: {r: 16}\n")
    assert cli.main(["config", str(tmp_path / "c.yaml"), "train.lr=1e-3"]) == 0
    resolved = config.from_dict(yaml.safe_load(capsys.readouterr().out))
    assert (resolved.method.r, resolved.train.lr) == (16, 1e-3)
    assert cli.main(["config", "train.lr=-1"]) == 2
    assert capsys.readouterr().err == "slimtune config: error: train.lr: must be positive\n"


# --- issue 27 item 14: numbers in ASCII digits without underscores; a held-out split that leaves no batch ---

ODD = "write numbers with the ASCII digits 0-9 and no underscores (e.g. 12, 1000, 2e-4)"


@pytest.mark.parametrize("item, shown", [
    ("train.max_steps=\u0661\u0662", "'\u0661\u0662'"),  # Arabic-Indic 12: int() read it as 12
    ("train.max_steps=1_0", "'1_0'"),  # int() read it as 10
    ("train.lr=2_0e-4", "'2_0e-4'"),
    ("train.batch_size=\uff18", "'\uff18'"),  # a full-width 8
    ("method.layers_to_transform=1,\u0662", "'\u0662'"),
])
def test_numbers_in_other_digits_or_with_underscores_are_refused(item, shown):
    with pytest.raises(ConfigError) as err:
        config.load(None, [item])
    assert problems(err) == [f"override {item.split('=')[0]}: {shown}: {ODD}"]


def test_yaml_numbers_with_underscores_or_other_digits_are_refused(tmp_path):
    """YAML 1.1 reads 1_0 as the integer 10 and 1_0.5 as 10.5."""
    path = write(tmp_path, "train:\n  max_steps: 1_0\n  lr: 1_0.5e-4\n  seed: \u0661\u0662\n")
    with pytest.raises(ConfigError) as err:
        config.load(path)
    assert problems(err) == [f"{path}: train.max_steps: '1_0': {ODD}", f"{path}: train.lr: '1_0.5e-4': {ODD}",
                             f"{path}: train.seed: '\u0661\u0662': {ODD}"]


def test_an_eval_split_leaving_less_than_a_batch_is_refused(tmp_path, tiny_model_dir, capsys):
    """data.eval_size=1e9 held out 39 of 40 records and trained on the one left, with exit 0."""
    from conftest import lora_run_config

    path = lora_run_config(tmp_path, tiny_model_dir, "run", copies=5, data={"eval_size": 1e9})
    assert cli.main(["train", str(path), "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        "slimtune train: error: data.eval_size=1e+09 holds out 39 of the 40 training records, leaving 1 to train on, "
        "fewer than one step's batch (train.batch_size=4); set data.eval_size to a fraction below 1 or a count of "
        "at most 36, or give held-out records in data.eval\n")
    assert not (tmp_path / "run").exists()
    # a count below the records' number that still leaves less than a batch trains, warned about
    assert cli.main(["train", str(path), "--no-progress", "data.eval_size=37", "train.max_steps=1"]) == 0
    assert ("warning: data.eval_size=37 holds out 37 of the 40 training records, leaving 3 to train on, fewer than "
            "one step's batch (train.batch_size=4): every step trains on the same few records; a smaller "
            "data.eval_size trains on more\n") in capsys.readouterr().out
