"""Fixtures: a tiny byte-level BPE tokenizer and a tiny random Llama-style model, built in-process."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

# One intra-op thread for the tests and the processes they start, unless OMP_NUM_THREADS says otherwise: on a
# busy 2-core machine torch's 2 OpenMP threads spin waiting for each other (measured under load: a 24-token
# greedy answer of the embedded model 9-16 s on 2 threads, 0.6 s on 1), and the tiny models gain nothing from 2.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# The slowest test modules, slowest first (docs/development.md): under pytest-xdist (scripts/test.sh) they are
# handed out first, so the workers finish together instead of one starting a minutes-long module at the end.
SLOWEST = ["tests/test_embedded_run.py", "tests/engine/test_distributed.py",
           "tests/objectives/test_dpo_embedded.py", "tests/ui/test_browser.py",
           "tests/kernels/test_compiled.py", "tests/compare/test_compare.py", "tests/compare/test_objectives.py",
           "tests/engine/test_resume.py", "tests/objectives/test_grpo_embedded.py"]


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Whole modules to the next free worker (a module-scoped fixture is built once), in the order the workers
    collected them (pytest_collection_modifyitems: SLOWEST first), not reordered by their number of tests."""
    from xdist.scheduler import LoadFileScheduling

    if config.getvalue("dist") != "load":  # -n alone means load; another --dist is the caller's choice
        return None
    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a worker of scripts/test.sh: SLOWEST's modules first
        rank = {path: i for i, path in enumerate(SLOWEST)}
        items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(SLOWEST)))


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<|begin_of_text|>",
           "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "[gMASK]", "sop", "<|system|>",
           "<|user|>", "<|assistant|>"]
CORPUS = ["Hello there! How are you today?", "The capital of France is Paris.", "Give three tips for staying healthy.",
          "Human: Assistant: [INST] [/INST] <<SYS>> <</SYS>> system user assistant", "1 2 3 4 5 6 7 8 9 0",
          "the quick brown fox jumps over the lazy dog", "你好，世界。中文字符", "Who are you? I am a small model."]


def make_tokenizer(eos: str = "<|im_end|>", pad: str | None = "<|im_end|>", chat_template: str | None = CHATML):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token="<|im_start|>",
                                   pad_token=pad, unk_token=None)
    if chat_template:
        fast.chat_template = chat_template
    return fast


# Control tokens of the gemma3, phi3, phi4 and qwen3 templates, added after SPECIAL so the ids of the other
# tokens stay those every other test was written against; Qwen3 holds <think> as a plain (not special) token.
FAMILY_SPECIAL = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<|end|>", "<|im_sep|>"]


def family_tokenizer(chat_template: str | None = CHATML):
    """make_tokenizer() with the newer families' control tokens (FAMILY_SPECIAL) and Qwen3's <think> tokens."""
    tok = make_tokenizer(chat_template=chat_template)
    tok.add_special_tokens({"additional_special_tokens": FAMILY_SPECIAL})
    tok.add_tokens(["<think>", "</think>"])
    return tok


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def make_model(vocab_size: int, arch: str = "llama", seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=512, tie_word_embeddings=True,
                               initializer_range=0.2)  # larger than 0.02 so a few LoRA steps move the loss
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="session")
def embedded_model():
    """(model, tokenizer) of the embedded SmolLM2, loaded (converted into the cache the first time) once per
    test session and shared by the modules that only read it: no test may train or change it in place."""
    from slimtune import models

    return models.load("embedded")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A transformers model folder (random tiny Llama + tokenizer) that model.path can name."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_script(path: Path) -> object:
    """A script of the repository (examples/, bench/, scripts/: not a package) as a module named after its file."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


WORDS = ["Paris", "blue", "seven", "the fox", "healthy food", "water", "sleep", "a dog"]


def lora_run_config(tmp: Path, model_dir: Path, name: str, copies: int = 4, data: dict | None = None,
                    method: dict | None = None, **train) -> Path:
    """A small LoRA run on the CPU written to tmp/NAME.yaml: 8 x `copies` records of ~52 tokens in
    tmp/train.jsonl (4 held out), r=4 on q/v with dropout 0.1 (so torch's RNG matters), fp32; `data`,
    `method` and `train` keys override the defaults."""
    path = tmp / "train.jsonl"
    if not path.exists():
        write_jsonl(path, [{"instruction": f"Say something about {w} ({i}).", "output": f"Here is {w}. {w} is nice."}
                           for w in WORDS for i in range(copies)])
    tree = {
        "model": {"path": str(model_dir)},
        "data": {"train": str(path), "eval_size": 4, "max_len": 64, **(data or {})},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"],
                   **(method or {})},
        "train": {"output_dir": str(tmp / name), "lr": 1e-2, "warmup_steps": 2, "save_every": 0,
                  "precision": "fp32", "device": "cpu", **train},
    }
    out = tmp / f"{name}.yaml"
    out.write_text(yaml.safe_dump(tree))
    return out


@pytest.fixture
def alpaca_rows() -> list[dict]:
    words = ["Paris", "blue", "seven", "the fox", "healthy food", "water", "sleep", "a dog"]
    return [{"instruction": f"Say something about {w}.", "input": "", "output": f"Here is {w}. {w} is nice."}
            for w in words for _ in range(4)]
