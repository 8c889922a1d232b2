"""bench/moe_speed.py without a GPU: the Qwen3-MoE shape built straight into 4-bit (tiny), the recipes' commands,
and the sparse folder unsloth's recipe loads (expert weights as holes of zeros)."""
import argparse
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "bench" / "peers")]
import moe_speed  # noqa: E402
import unsloth_recipe  # noqa: E402


def test_the_moe_shape_is_built_in_4bit_one_tensor_at_a_time():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    model = moe_speed.build_4bit("qwen3moe-tiny", "cpu", torch.float32, 64)
    kinds = {type(p).__name__ for p in model.parameters()}
    assert kinds == {"Parameter", "Params4bit", "Nf4Stack"}
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 2 * 4  # q, k, v, o; lm_head stays
    assert model.model.norm.weight.eq(1).all() and model.lm_head.weight.std().item() == pytest.approx(0.02, rel=0.2)
    loss = model(input_ids=torch.tensor([[5, 6, 7]]), labels=torch.tensor([[5, 6, 7]])).loss
    assert torch.isfinite(loss)


def test_the_recipes_run_this_script_unsloth_recipe_and_speed_py(tmp_path):
    a = argparse.Namespace(shape="qwen3moe", len=4096, steps=10, warmup=2, folder="/dev/shm", smoke=False,
                           max_len=1024, key=[])
    (ours,) = moe_speed.commands("slimtune-qlora", a)
    assert ours[1:] == [str(ROOT / "bench" / "moe_speed.py"), "--worker", "--shape", "qwen3moe", "--len", "4096",
                        "--steps", "10", "--warmup", "2"]
    a.key = ["train.fused_lora=on"]
    (keyed,) = moe_speed.commands("slimtune-qlora", a)
    assert keyed[len(ours):] == ["--key", "train.fused_lora=on"]
    assert moe_speed._config(a, tmp_path, 3, "cpu").train.fused_lora == "on"
    *make, theirs = moe_speed.commands("unsloth-qlora", a)
    assert [c for c in make if "--make" in c] == make and all("--zero-experts" in c for c in make)
    assert theirs[theirs.index("--record_len") + 1] == "4096" and "--load-in-4bit" in theirs
    sizes = [c[c.index("--size") + 1] for c in moe_speed.commands("families", a) if "--make" not in c]
    assert sorted(set(sizes)) == ["gemma3", "phi3"]


def test_the_sparse_folder_reads_zero_experts_and_random_rest(tmp_path):
    from transformers import AutoModelForCausalLM

    unsloth_recipe.make_model("qwen3moe-tiny", str(tmp_path), zero_experts=True)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_proj.abs().sum() == 0 and experts.down_proj.abs().sum() == 0
    assert model.model.layers[1].mlp.gate.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert model.model.norm.weight.eq(1).all()
