"""examples/bert_span_lora.py on the CPU: a tiny BERT wrapped with two span heads learns the synthetic
spans, only LoRA and the heads change, plain peft reloads it; and the tutorial's printout from the
bert-base shape on the meta device."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "bert_span_lora.py"


@pytest.fixture(scope="module")
def example():
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def trained(example, tmp_path_factory):
    return example.train_span_extractor(tmp_path_factory.mktemp("bert-span"), steps=60, log=lambda *a: None)


def test_the_loss_drops_and_span_f1_rises(trained):
    losses = trained["losses"]
    assert len(losses) == 60 and losses[-1] < 0.25 * losses[0], losses
    # measured: 0.315 before, 0.994 after (60 steps, 128 training examples)
    assert trained["f1_after"] > 0.9 and trained["f1_after"] > trained["f1_before"] + 0.4


def test_only_lora_and_the_heads_changed(trained):
    changed, params = trained["changed"], trained["params"]
    trained_kind = [n for n in params if "lora_" in n or ".modules_to_save." in n]
    assert changed == sorted(trained_kind)  # each LoRA matrix and head copy moved; everything else bit-identical
    assert {n.split(".modules_to_save.")[0].rsplit(".", 1)[-1] for n in changed if "modules_to_save" in n} \
        == {"linear_1", "linear_2"}


def test_plain_peft_reloads_the_adapter_with_its_heads(trained):
    assert trained["logit_diff"] <= 1e-5


def test_the_tutorials_printout_from_the_meta_device(example):
    counts = example.tutorial_counts()
    assert counts["heads frozen"] == "trainable params: 589,824 || all params: 110,073,602 || trainable%: 0.5358"
    assert counts["heads frozen, warning"].startswith("linear_1, linear_2: not part of the pretrained model, yet "
                                                      "method lora leaves them frozen")
    # the heads train: 2 x Linear(768, 1) = 1,538 more trainable, and peft keeps a frozen original of each
    assert counts["heads in modules_to_save"] == \
        "trainable params: 591,362 || all params: 110,075,140 || trainable%: 0.5372"
    assert "heads in modules_to_save, warning" not in counts


def test_the_script_runs_as_a_command():
    out = subprocess.run([sys.executable, str(SCRIPT), "--tutorial-counts"], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "heads frozen: trainable params: 589,824 || all params: 110,073,602" in out.stdout


def test_a_local_bert_folder_is_the_base(example, tmp_path):
    example.tiny_bert(seed=5).save_pretrained(tmp_path / "bert")
    res = example.train_span_extractor(tmp_path / "out", str(tmp_path / "bert"), steps=2, n=32, log=lambda *a: None)
    assert len(res["losses"]) == 2 and res["logit_diff"] <= 1e-5
    assert not (tmp_path / "out" / "base").exists()  # the reload reads the given folder
