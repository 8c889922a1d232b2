"""LoRA on mixture-of-experts models (tiny random Qwen3-MoE, Mixtral and gpt-oss: 2 layers, hidden 64, 4
experts, top-2): the default targets and all-linear reach the fused expert weights, counted as peft counts
them; training moves every expert; the router stays frozen unless method.train_router; merging reproduces
the adapter model; 8-bit qlora refuses fused experts, which bitsandbytes leaves unquantized."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import lora_run_config
from slimtune import config, load_config, methods
from slimtune import train as train_mod
from slimtune.export import merge as merge_mod
from slimtune.methods import experts, quant, targets

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=True,
             initializer_range=0.2)
MOE = {
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, rope_parameters={"rope_type": "default",
                                                                              "rope_theta": 10000.0}),
}
ROUTER = {"qwen3_moe": "gate", "mixtral": "gate", "gpt_oss": "router"}


def tiny(arch: str, vocab: int = 300, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, vocab_size=vocab, **SHAPE, **MOE[arch]))


def _apply(model, **fields):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return methods.apply(model, config.MethodConfig(**{"r": 4, "dropout": 0.0, **fields}))


@pytest.mark.parametrize("arch", list(MOE))
@pytest.mark.parametrize("targets", [[], ["all-linear"]])
def test_the_targets_reach_every_expert_and_count_as_peft_counts(arch, targets):
    from peft import LoraConfig, get_peft_model

    ours = _apply(tiny(arch), target_modules=targets)
    attention = ["q_proj", "v_proj"] if not targets else ["q_proj", "k_proj", "v_proj", "o_proj"]
    fused = [f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("gate_up_proj", "down_proj")]
    theirs = get_peft_model(tiny(arch), LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=attention,
                                                   target_parameters=fused))
    assert methods.count_parameters(ours) == methods.count_parameters(theirs)
    # every layer: (gate_up + down) x r x 4 experts x (in + out) on top of the attention's LoRA
    wide = 4 * 4 * (64 + 256) + 4 * 4 * (128 + 64)  # intermediate 128 per expert
    expert_lora = 4 * 4 * (64 + 64) + 4 * 4 * (64 + 32) if arch == "qwen3_moe" else wide  # moe_intermediate 32
    q_v = 4 * (64 + 64) + 4 * (64 + 32)
    attn = q_v if not targets else q_v + 4 * (64 + 32) + 4 * (64 + 64)
    assert methods.count_parameters(ours)[0] == 2 * (attn + expert_lora)
    assert experts.report(ours, False) == ("experts: 2 of 2 layers' expert weights adapted (down_proj, gate_up_proj; "
                                           "4 experts each); router frozen (method.train_router=true trains it)")


def test_targets_lists_the_fused_expert_weights():
    table = targets.describe(tiny("qwen3_moe"))
    assert "all-linear = k_proj, o_proj, q_proj, v_proj" in table
    assert "fused expert weights (in the default and all-linear): down_proj, gate_up_proj (x4); routers frozen " \
           "unless method.train_router" in table


@pytest.mark.parametrize("arch", list(MOE))
def test_the_router_is_frozen_unless_train_router(arch):
    frozen = _apply(tiny(arch))
    assert not [n for n, p in frozen.named_parameters() if f".{ROUTER[arch]}." in n and p.requires_grad]
    trained = _apply(tiny(arch), train_router=True)
    router = sorted(n for n, p in trained.named_parameters() if f".{ROUTER[arch]}." in n and p.requires_grad)
    assert len(router) == (4 if arch == "gpt_oss" else 2)  # weight (+ gpt-oss's bias) of 2 layers' routers
    assert experts.report(trained, True).endswith("router trained in full (method.train_router)")


def test_train_router_on_a_dense_model_is_refused():
    from conftest import make_model

    with pytest.raises(methods.MethodError, match="method.train_router: LlamaForCausalLM has no mixture-of-experts"):
        _apply(make_model(300), train_router=True)


def _expert_outputs(block, x: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Each expert alone on x (every token routed to it with weight 1), through the adapted experts module."""
    outs = []
    with torch.no_grad():
        for e in range(n):
            index = torch.full((x.shape[0], 1), e, dtype=torch.long)
            outs.append(block.experts(x, index, torch.ones(x.shape[0], 1)))
    return outs


@pytest.mark.parametrize("arch", list(MOE))
def test_a_few_steps_change_every_experts_output(arch):
    model = _apply(tiny(arch))
    blocks = [layer.mlp for layer in model.get_base_model().model.layers]
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    before = [_expert_outputs(b, x, 4) for b in blocks]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 300, (4, 24), generator=torch.Generator().manual_seed(2))  # 96 tokens x top-2 over 4
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = [_expert_outputs(b, x, 4) for b in blocks]
    moved = [[float((a - b).abs().max()) for a, b in zip(layer_a, layer_b)] for layer_a, layer_b in zip(after, before)]
    assert all(m > 1e-3 for layer in moved for m in layer), moved  # each of 2 layers x 4 experts


def test_dropout_stays_on_the_linear_layers_and_off_the_fused_experts():
    """peft refuses dropout on a fused weight (lora.ParamWrapper); method.dropout still applies elsewhere."""
    model = methods.apply(tiny("qwen3_moe"), config.MethodConfig(r=4, dropout=0.1))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q.lora_dropout["default"], torch.nn.Dropout) and q.lora_dropout["default"].p == 0.1
    assert model.peft_config["default"].target_parameters


def test_dora_keeps_its_defaults_off_fused_experts_and_refuses_them_by_name():
    model = _apply(tiny("qwen3_moe"), name="dora")
    assert experts.report(model, False).startswith("experts: 0 of 2 layers' expert weights adapted (none")
    with pytest.raises(methods.MethodError, match="method dora: peft adapts fused expert weights"):
        _apply(tiny("qwen3_moe"), name="dora", target_modules=["q_proj", "gate_up_proj"])


def test_an_expert_weight_named_alone_is_a_target_parameter():
    model = _apply(tiny("mixtral"), target_modules=["down_proj"])
    cfg = model.peft_config["default"]
    assert sorted(cfg.target_parameters) == [f"model.layers.{i}.mlp.experts.down_proj" for i in range(2)]
    assert not cfg.target_modules
    layered = _apply(tiny("mixtral"), target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    assert set(layered.peft_config["default"].target_parameters) == {"model.layers.1.mlp.experts.down_proj"}
    with pytest.raises(methods.MethodError, match=r"method.r=48 is larger than the width of "
                                                  r"model.layers.0.mlp.experts.down_proj \(32 = "):
        _apply(tiny("qwen3_moe"), r=48, target_modules=["q_proj", "down_proj"])  # experts' intermediate: 32


def test_8bit_qlora_refuses_fused_experts_with_the_reason():
    """Fused 3-D experts are packed in 4-bit only (methods/quant_experts.py; checked on the CPU model)."""
    with pytest.raises(methods.MethodError, match=r"method qlora with method.quant_bits=8: Qwen3MoeForCausalLM stores "
                       r"its experts as fused 3-D weights \(model.layers.0.mlp.experts.gate_up_proj and 3 more, "
                       r"\d+% of the model\), which slimtune packs in 4-bit only; set method.quant_bits=4"):
        quant.prepare(tiny("qwen3_moe"), 8)


def test_8bit_qlora_of_fused_experts_is_refused_from_config_json_before_the_load(tmp_path):
    """train checks this right after quantization_config (CUDA), before bitsandbytes would load the whole model."""
    tiny("mixtral").config.save_pretrained(tmp_path)  # config.json alone: no weights to read
    with pytest.raises(methods.MethodError, match=r"method qlora with method.quant_bits=8: MixtralForCausalLM"):
        quant.check_base(str(tmp_path), bits=8)
    quant.check_base(str(tmp_path), bits=4)  # 4-bit packs them


@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_oss"])
def test_a_trained_moe_run_merges_to_the_adapter_models_outputs(arch, tmp_path, tokenizer):
    model_dir = tmp_path / arch
    tiny(arch, vocab=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    router = arch == "gpt_oss"  # its router trained in full too: merged from peft's modules_to_save copy
    path = lora_run_config(tmp_path, model_dir, "run", copies=1,
                           method={"target_modules": [], "dropout": 0.0, "train_router": router},
                           max_steps=2, micro_batch_size=2, grad_accum=1, eval_at_start=False)
    lines: list[str] = []
    train_mod.from_config(load_config(path), show_progress=False,
                          log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    said = "router trained in full (method.train_router)" if router else \
        "router frozen (method.train_router=true trains it)"
    assert f"experts: 2 of 2 layers' expert weights adapted (down_proj, gate_up_proj; 4 experts each); {said}" in lines
    result = merge_mod.merge(tmp_path / "run", tmp_path / "merged", log=lines.append)
    # fp32: W + BA rounded once per weight, sums re-ordered: measured 1.1e-5 with logits up to 6.7 (1.7e-6 of the
    # scale), the size merge.py's TOLERANCE comment reports for dense models; 1e-5 of the scale leaves 6x margin
    bound = 1e-5 * result["logit_scale"]
    assert result["merge_diff"] < bound and result["saved_diff"] < bound, result
    from safetensors.torch import load_file

    # saved as the checkpoint stores experts (transformers converts back: Qwen3-MoE one Linear per expert,
    # gpt-oss fused): every expert's weights of every layer took the adapter, and nothing else was renamed
    base, merged = load_file(model_dir / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert sorted(base) == sorted(merged)
    weights = [k for k in base if ".mlp.experts." in k and "bias" not in k]
    moved = {k: (merged[k] - base[k]).abs().flatten(1 if base[k].ndim == 3 else 0).amax(-1) for k in weights}
    count = sum(v.numel() for v in moved.values())
    assert count == 2 * 4 * (3 if arch == "qwen3_moe" else 2), sorted(moved)  # per layer: 4 experts' projections
    assert all((v > 0).all() for v in moved.values()), moved
    routers = [k for k in base if ".mlp.router." in k or ".mlp.gate." in k]
    assert len(routers) == (4 if router else 2) and all(bool((merged[k] != base[k]).any()) == router for k in routers)


def test_a_moe_run_resumes_to_the_same_losses(tmp_path, tokenizer):
    """Checkpoints hold the experts' LoRA by parameter name: back at step 2, steps 3 and 4 repeat (fp32, CPU)."""
    import shutil

    from slimtune.runs import checkpoint
    from slimtune.runs.metrics_log import read_metrics

    model_dir = tmp_path / "qwen3_moe"
    tiny("qwen3_moe", vocab=len(tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    path = lora_run_config(tmp_path, model_dir, "run", copies=1, method={"target_modules": [], "dropout": 0.0},
                           max_steps=4, micro_batch_size=2, grad_accum=1, eval_at_start=False, save_every=1,
                           keep_checkpoints=0)
    quiet = dict(show_progress=False, log=lambda *a: None)
    train_mod.from_config(load_config(path), **quiet)
    run = tmp_path / "run"
    first = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    for step in (3, 4):
        shutil.rmtree(checkpoint.step_folder(run, step))
    train_mod.from_config(load_config(path), resume=True, **quiet)
    again = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert len(first) == len(again) == 4 and again[:2] == first[:2]
    assert again[2:] == pytest.approx(first[2:], abs=1e-6) and first[3] != first[1]


class _Expert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3, self.w2 = torch.nn.Linear(16, 32), torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)


class _Block(torch.nn.Module):
    """One expert per nn.Linear set, as remote-code MoE models keep them, and a Linear router."""

    def __init__(self):
        super().__init__()
        self.q_proj, self.v_proj = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)
        self.mlp = torch.nn.Module()
        self.mlp.gate = torch.nn.Linear(16, 4)
        self.mlp.experts = torch.nn.ModuleList(_Expert() for _ in range(4))


def test_per_expert_linears_are_in_the_default_and_the_linear_router_out_of_all_linear():
    model = torch.nn.Sequential(_Block(), _Block())
    assert targets.default_targets(model) == ["q_proj", "v_proj", "w1", "w2", "w3"]
    assert targets.resolve(model, ["all-linear"]) == ["q_proj", "v_proj", "w1", "w2", "w3"]  # no "gate"
    adapted = _apply(model)
    assert experts.report(adapted, False) == ("experts: 2 of 2 layers' expert weights adapted (w1, w2, w3; 4 experts "
                                              "each); router frozen (method.train_router=true trains it)")
    assert not [n for n, p in adapted.named_parameters() if ".gate." in n and p.requires_grad]


def test_train_router_is_a_lora_key_set_by_override():
    from slimtune.config import checks

    cfg = config.load(None, ["method.train_router=true"])
    assert cfg.method.train_router is True and checks.unused(cfg) == []
    cfg = config.load(None, ["method.name=full", "method.train_router=true"])
    assert checks.unused(cfg) == ["method.train_router=True has no effect with method.name=full, which reads no other "
                                  "method.* key; remove it (perhaps it was set for another method)"]
