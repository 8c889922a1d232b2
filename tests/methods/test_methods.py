"""Every method x four tiny random architectures: trains, changes only what it should, saves, reloads exactly."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from conftest import make_tokenizer
from slimtune import config, methods
from slimtune.data import encode_examples
from slimtune.data.collate import collate, pad_id
from slimtune.data.readers import from_alpaca
from slimtune.engine.loop import step
from slimtune.engine.optim import build_optimizer, build_scheduler
from slimtune.methods.base import MethodError, is_peft

ARCHS = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),  # q/k/v have biases
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),  # Conv1D projections
}
METHODS = [m for m in config.METHODS if m != "qlora"]  # qlora needs CUDA: tested below and in bench/
# Adam's step is ~lr per parameter: the few-parameter prompt methods need a larger one to move in 10 steps
LR = {"full": 3e-3, "freeze": 3e-3, "prompt_tuning": 1e-1, "p_tuning": 1e-2, "prefix_tuning": 3e-1, "ia3": 1e-1}


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, tok):
    """A saved tiny random model per architecture (config.json + safetensors)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = {}
    for arch, kw in ARCHS.items():
        torch.manual_seed(0)
        cfg = AutoConfig.for_model(arch, vocab_size=len(tok), tie_word_embeddings=True, initializer_range=0.2, **kw)
        folder = tmp_path_factory.mktemp(arch)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
        tok.save_pretrained(folder)  # models.load reads the tokenizer beside the weights
        out[arch] = folder
    return out


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def _method_cfg(name: str) -> config.MethodConfig:
    return config.MethodConfig(name=name, r=4, alpha=8, dropout=0.0, num_virtual_tokens=4, trainable_layers=1,
                               encoder_hidden_size=16)


def _batch(tok):
    exs = [from_alpaca({"instruction": f"Say something about {w}.", "output": f"Here is {w}. {w} is nice."}, w)
           for w in ("Paris", "blue", "seven", "the fox")]
    return collate(encode_examples(exs, tok, config.DataConfig(max_len=64))[0], pad_id(tok))


def _logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def _reload(peft: bool, folder, out_dir):
    base = _load(folder)
    if peft:
        from peft import PeftModel

        return PeftModel.from_pretrained(base, out_dir)  # plain peft: no slimtune code
    from slimtune.methods import parts

    return parts.load(base, out_dir)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", METHODS)
def test_method_trains_changes_only_its_parameters_and_reloads(name, arch, arch_dirs, tok, tmp_path):
    torch.manual_seed(0)
    model = _load(arch_dirs[arch])
    if name == "bitfit" and arch == "llama":  # Llama has no biases: a clear error, not a silent no-op
        with pytest.raises(MethodError, match="has none"):
            methods.apply(model, _method_cfg(name))
        return
    model = methods.apply(model, _method_cfg(name))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = set(methods.trainable(model))
    assert trainable and len(trainable) < len(before) or name == "full"

    batch = _batch(tok)
    tc = config.TrainConfig(lr=LR.get(name, 1e-2), scheduler="constant")
    opt = build_optimizer(model, tc)
    sched = build_scheduler(opt, 10, tc)
    model.train()
    losses = [step(model, [batch], opt, sched, 1.0)["loss"] for _ in range(10)]
    assert losses[-1] < 0.95 * losses[0], losses

    for n, p in model.named_parameters():
        if n in trainable:
            continue
        assert torch.equal(p, before[n]), f"frozen parameter {n} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in trainable)

    from slimtune.runs.adapter import save

    save(model, config.Config(method=_method_cfg(name)), tmp_path)
    ids = batch["input_ids"][:1]
    reloaded = _reload(is_peft(model), arch_dirs[arch], tmp_path)
    ours = _logits(model, ids)
    diff = (_logits(reloaded, ids) - ours).abs().max().item()
    # PiSSA trains on a residual base W_res = fl(W - B0 A0) and is saved converted to a rank-2r LoRA on the
    # original W: the same function, but W_res's fp32 rounding is baked in, so the reload agrees to fp32
    # precision relative to the logits (measured 1.4e-6 to 2.1e-6 x max|logit| here), not to an absolute 1e-5.
    tol = 4e-6 * ours.abs().max().item() if name == "pissa" else 1e-5
    assert diff <= tol, (diff, tol)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", config.METHODS)
def test_meta_device_counts_equal_real_counts(name, arch, arch_dirs):
    """Sizing a method from config.json alone gives the numbers the real model gives."""
    cfg = _method_cfg(name)
    if name == "bitfit" and arch == "llama":
        with pytest.raises(MethodError):
            methods.count_on_meta(str(arch_dirs[arch]), cfg)
        return
    meta = methods.count_on_meta(str(arch_dirs[arch]), cfg)
    shaped = replace(cfg, name="lora") if name in ("qlora", "pissa") else cfg
    model = methods.apply(_load(arch_dirs[arch]), shaped)
    real = methods.count_parameters(model)
    assert meta == real
    if is_peft(model):
        assert real == model.get_nb_trainable_parameters()  # the same numbers peft prints


def test_qlora_on_cpu_is_a_clear_error(monkeypatch):
    from slimtune.methods.quant import quantization_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(MethodError, match="needs a CUDA GPU.*method.name=lora"):
        quantization_config(_method_cfg("qlora"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="qlora quantizes with bitsandbytes, which needs CUDA")
def test_qlora_trains_on_gpu(arch_dirs, tok):  # pragma: no cover - run through bench/ on the GPU machine
    from slimtune import models
    from slimtune.methods.quant import quantization_config

    cfg = _method_cfg("qlora")
    model, _ = models.load(str(arch_dirs["llama"]), "bf16", device="cuda", quantization=quantization_config(cfg))
    model = methods.apply(model, cfg)
    batch = {k: v.cuda() for k, v in _batch(tok).items()}
    tc = config.TrainConfig(lr=1e-2, scheduler="constant")
    opt = build_optimizer(model, tc)
    losses = [step(model, [batch], opt, build_scheduler(opt, 10, tc), 1.0)["loss"] for _ in range(10)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("precision,bf16_gpu,dtype", [("fp16", True, torch.float16), ("fp16-pure", True, torch.float16),
                                                    ("bf16", True, torch.bfloat16), ("auto", True, torch.bfloat16),
                                                    ("auto", False, torch.float16)])
def test_qlora_compute_dtype_follows_the_precision(monkeypatch, precision, bf16_gpu, dtype):
    import importlib.util

    from slimtune.methods import quant

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    real = importlib.util.find_spec
    monkeypatch.setattr(quant.importlib.util, "find_spec",
                        lambda n, *a: object() if n == "bitsandbytes" else real(n, *a))
    assert quant.quantization_config(_method_cfg("qlora"), precision).bnb_4bit_compute_dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="qlora quantizes with bitsandbytes, which needs CUDA")
@pytest.mark.parametrize("precision,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_qlora_base_and_matmuls_in_the_runs_precision(arch_dirs, precision, dtype):  # pragma: no cover - GPU
    """As train loads it: fp16 runs keep the unquantized parts and the 4-bit matmuls in fp16 (a bf16 embedding
    under fp16 autocast made half copies of every layer input: +40% activation memory, measured)."""
    from slimtune import models
    from slimtune.engine.precision import base_dtype_name
    from slimtune.methods.quant import quantization_config

    cfg = config.Config()
    cfg.model.path, cfg.method, cfg.train.precision = str(arch_dirs["llama"]), _method_cfg("qlora"), precision
    quant = quantization_config(cfg.method, cfg.train.precision)
    model, _ = models.load(cfg.model.path, base_dtype_name(cfg, "cuda"), device="cuda", quantization=quant)
    assert model.get_input_embeddings().weight.dtype == dtype
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == dtype


def test_layers_to_transform_and_modules_to_save(arch_dirs):
    cfg = replace(_method_cfg("lora"), layers_to_transform=[1], modules_to_save=["lm_head"])
    model = methods.apply(_load(arch_dirs["llama"]), cfg)
    lora_names = [n for n in methods.trainable(model) if "lora_" in n]
    assert lora_names and all(".layers.1." in n for n in lora_names)
    assert any("lm_head" in n and "modules_to_save" in n for n in methods.trainable(model))


def test_freeze_pattern_and_bad_pattern(arch_dirs):
    model = methods.apply(_load(arch_dirs["llama"]), replace(_method_cfg("freeze"), trainable_pattern=r"norm"))
    names = methods.trainable(model)
    assert names and all("norm" in n for n in names)
    with pytest.raises(MethodError, match="matches no parameter"):
        methods.apply(_load(arch_dirs["llama"]), replace(_method_cfg("freeze"), trainable_pattern="nothing_here"))
    with pytest.raises(MethodError, match="between 1 and the model's 2 layers"):
        methods.apply(_load(arch_dirs["llama"]), replace(_method_cfg("freeze"), trainable_layers=3))


def test_freeze_trains_exactly_the_last_layer(arch_dirs):
    model = methods.apply(_load(arch_dirs["gpt2"]), _method_cfg("freeze"))
    names = methods.trainable(model)
    assert names and all(n.startswith("transformer.h.1.") for n in names)
    assert len(names) == sum(1 for n, _ in model.named_parameters() if n.startswith("transformer.h.1."))


@pytest.mark.parametrize("change, line", [
    (dict(layers_to_transform=[1, 5]), "method.layers_to_transform: 5 out of range: this model has 2 decoder layers "
                                       "in model.layers, numbered 0 to 1"),
    (dict(modules_to_save=["lm_head", "score"]), "method.modules_to_save: score matches no module of this model; "
                                                 "module names end in: act_fn, down_proj, embed_tokens, gate_proj, "
                                                 "input_layernorm, k_proj, layers, lm_head, mlp, model, norm, o_proj, "
                                                 "post_attention_layernorm, q_proj, rotary_emb, self_attn, up_proj, "
                                                 "v_proj"),
    (dict(r=33, target_modules=["q_proj", "k_proj"]), "method.r=33 is larger than the width of "
                                                      "model.layers.0.self_attn.k_proj (32 = the smaller of its in and "
                                                      "out features); set method.r <= 32, or leave that layer out of "
                                                      "method.target_modules"),
])
def test_method_settings_that_cannot_apply_are_one_line(arch_dirs, change, line):
    """Issue 15 item 14: out-of-range layers raised peft's NoMatchingPeftModuleError; a modules_to_save that
    matched nothing and a rank above a layer's width were accepted silently."""
    with pytest.raises(MethodError) as err:
        methods.apply(_load(arch_dirs["llama"]), replace(_method_cfg("lora"), **change))
    assert str(err.value) == line
    model = methods.apply(_load(arch_dirs["llama"]), replace(_method_cfg("lora"), r=32, target_modules=["k_proj"]))
    assert methods.trainable(model)  # the width itself is fine


def test_ia3_modules_to_save_must_match(arch_dirs):
    with pytest.raises(MethodError, match="method.modules_to_save: nothing matches no module of this model"):
        methods.apply(_load(arch_dirs["llama"]), replace(_method_cfg("ia3"), modules_to_save=["nothing"]))
