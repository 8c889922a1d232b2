"""methods/quant.load_base: a qlora base whose experts are fused 3-D weights loads onto the CPU (bitsandbytes
quantizes its Linear layers there) and each 16-bit expert stack goes alone to the run's device to be packed in
NF4, so the 16-bit experts never all reach the GPU. On the CPU (bitsandbytes' CPU backend) with tiny saved
Qwen3-MoE and Mixtral folders; the meta device stands in for a GPU where a second device is needed."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tokenizer
from slimtune import config, methods, models, trained
from slimtune.methods import experts, quant, quant_experts

pytest.importorskip("bitsandbytes")


def _quant(dtype: torch.dtype = torch.float32) -> object:
    """methods/quant.quantization_config's 4-bit settings, which it gives on a CUDA machine only."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved tiny random models with their tokenizer: Qwen3-MoE and Mixtral (2 layers, hidden 64, 4 experts,
    top-2: 2 fused stacks a layer) and a dense Llama."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tok, out = make_tokenizer(), {}
    extra = {"qwen3_moe": dict(num_experts=4, moe_intermediate_size=32, num_experts_per_tok=2),
             "mixtral": dict(num_local_experts=4, num_experts_per_tok=2), "llama": {}}
    for arch, more in extra.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
            arch, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, initializer_range=0.2, **more))
        out[arch] = tmp_path_factory.mktemp(arch)
        model.save_pretrained(out[arch])
        tok.save_pretrained(out[arch])
    return out


class Stop(Exception):
    pass


@pytest.mark.parametrize("arch, placed", [("qwen3_moe", "cpu"), ("mixtral", "cpu"), ("llama", "cuda")])
def test_a_qlora_run_asks_transformers_for_the_cpu_where_its_experts_are_fused(moe_dirs, tmp_path, monkeypatch,
                                                                                arch, placed):
    """Reloading a qlora run on a GPU (trained.load_run, as eval, chat and the app do): transformers is asked
    to load a model with fused experts onto the CPU, a dense one onto the GPU as before (its Linear layers are
    all it quantizes)."""
    import transformers

    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump({
        "model": {"path": str(moe_dirs[arch]), "dtype": "bf16"}, "data": {"train": str(tmp_path / "train.jsonl")},
        "method": {"name": "qlora"}, "train": {"precision": "bf16", "output_dir": str(folder)}}))
    asked = {}

    def from_pretrained(path: object, **kwargs: object) -> None:
        asked.update(kwargs)
        raise Stop

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # quantization_config asks for CUDA
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    with pytest.raises(Stop):
        trained.load_run(folder, device="cuda")
    assert asked["device_map"] == {"": placed}
    assert asked["quantization_config"].load_in_4bit


def test_each_16_bit_stack_is_packed_on_the_device_as_it_arrives(moe_dirs, monkeypatch):
    """load_base onto a second device (meta stands in for the GPU): transformers loads onto the CPU, and each
    16-bit expert stack it sets goes to the device and is packed before the next one arrives; then the model
    moves to the device (Module.to, recorded here: bitsandbytes' Linear4bit moves to a GPU, not to meta) and
    carries no accelerate hook."""
    import transformers

    events, devices, moved, real_load, real_quantize = [], [], [], models.load, quant_experts.quantize

    def arrive(module: torch.nn.Module, name: str, param: torch.Tensor | None) -> None:
        if param is not None and param.ndim == 3 and not param.is_meta and not quant_experts.is_nf4(param):
            events.append(("arrives", name, param.device.type))

    def quantize(weight: torch.Tensor, dtype: torch.dtype | None = None) -> quant_experts.Nf4Stack:
        events.append(("packed", weight.device.type))
        # packed on the CPU and moved: bitsandbytes caches its code tables on the device of its first call
        return real_quantize(torch.zeros(weight.shape, dtype=weight.dtype), dtype).moved(weight.device, None)

    monkeypatch.setattr(models, "load", lambda *args: devices.append(args[3]) or real_load(*args))
    monkeypatch.setattr(quant_experts, "quantize", quantize)
    monkeypatch.setattr(transformers.PreTrainedModel, "to", lambda self, device: moved.append(device) or self)
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(arrive)  # runs before load_base's
    try:
        model, _ = quant.load_base(str(moe_dirs["qwen3_moe"]), "fp32", False, "meta", _quant())
    finally:
        handle.remove()
    assert devices == ["cpu"]  # what models.load was asked for
    # 2 layers x (down_proj, gate_up_proj): each arrives on the CPU and is packed on the device before the next
    assert events == [e for name in ("down_proj", "gate_up_proj", "down_proj", "gate_up_proj")
                      for e in (("arrives", name, "cpu"), ("packed", "meta"))]
    assert {model.get_parameter(n).device.type for n in experts.fused(model)} == {"meta"} and moved == ["meta"]
    assert all(quant_experts.is_nf4(model.get_parameter(n)) for n in experts.fused(model))
    assert not [n for n, m in model.named_modules() if hasattr(m, "_hf_hook")]


def _qlora(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)  # the same A and B for both models
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = methods.apply(model, config.MethodConfig(name="qlora", r=4, dropout=0.0))
    for n, p in out.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)  # B starts at zero: a non-zero delta shows it is applied
    return out


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_the_loaded_qlora_model_gives_the_loss_of_loading_then_packing(moe_dirs, arch):
    """The model load_base gives (fp32 compute) has the loss of the same folder loaded whole onto the device
    and packed there, and carries no accelerate hook."""
    ours, _ = quant.load_base(str(moe_dirs[arch]), "fp32", False, "cpu", _quant())
    theirs, _ = models.load(str(moe_dirs[arch]), "fp32", device="cpu", quantization=_quant())
    quant_experts.quantize_experts(theirs)
    assert not [n for n, m in ours.named_modules() if hasattr(m, "_hf_hook")]
    assert getattr(ours, "hf_device_map", None) is None
    names = experts.fused(ours)
    assert len(names) == 4 and all(quant_experts.is_nf4(ours.get_parameter(n)) for n in names)
    assert sum(type(m).__name__ == "Linear4bit" for m in ours.modules()) == 8  # q, k, v, o of 2 layers
    ours, theirs = _qlora(ours), _qlora(theirs)
    x = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(input_ids=x, labels=x).loss.item(), theirs(input_ids=x, labels=x).loss.item()
    assert abs(a - b) < 1e-5, (a, b)


def test_a_dense_or_full_precision_base_loads_as_models_load(moe_dirs, monkeypatch):
    """Without a quantization config (lora, merging a qlora run) or without fused experts, load_base is
    models.load on the run's device."""
    calls = []
    monkeypatch.setattr(models, "load", lambda *args: calls.append(args) or (torch.nn.Linear(1, 1), None))
    quant.load_base(str(moe_dirs["qwen3_moe"]), "bf16", False, "cuda", None)
    quant.load_base(str(moe_dirs["llama"]), "bf16", False, "cuda", q := _quant())
    assert calls == [(str(moe_dirs["qwen3_moe"]), "bf16", False, "cuda", None),
                     (str(moe_dirs["llama"]), "bf16", False, "cuda", q)]
