"""kernels/select.py: one frozen record of the fast paths, the same keys fit's result reports, and the
estimator's record of what train on a GPU would choose."""
from __future__ import annotations

import dataclasses

import pytest

from conftest import make_model
from slimtune import config, methods
from slimtune.kernels import select


def test_enable_on_the_cpu_returns_a_frozen_record_with_a_dict_view():
    tc = config.TrainConfig(loss="chunked", fused_lora="on")
    model = methods.apply(make_model(100), config.MethodConfig(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    try:
        k = select.enable(model, tc, "cpu")
        assert k == select.Kernels(packing="off", chunked_loss=True, fused_lora_layers=4)  # 2 layers x q, v
        assert k["fused_lora_layers"] == 4 and list(k.as_dict()) == ["packing", "chunked_loss", "fused_lora_layers",
                                                                    "fused_expert_layers", "fused_norm_mlp",
                                                                    "fused_rope", "tiled_mlp", "compiled_layers"]
        with pytest.raises(dataclasses.FrozenInstanceError):
            k.chunked_loss = False
    finally:
        select.disable(model)


def test_the_estimators_record_is_what_a_gpu_run_chooses():
    cfg = config.Config()
    cfg.method = config.MethodConfig(dropout=0.0)
    assert select.on_gpu(cfg) == select.Kernels(packing="rows", chunked_loss=True, fused_lora_layers=1)
    assert select.on_gpu(cfg).fast
    cfg.method = config.MethodConfig(dropout=0.1)  # peft's own layers: not fused, not the fast engine
    assert select.on_gpu(cfg).fused_lora_layers == 0 and not select.on_gpu(cfg).fast
    cfg.train = config.TrainConfig(packing="rows", loss="plain")
    assert select.on_gpu(cfg) == select.Kernels(packing="rows")


@pytest.mark.parametrize("name", ["lora", "qlora", "rslora"])
def test_a_config_that_names_only_the_method_gets_the_fused_layers(tmp_path, name):
    """method.dropout defaults to 0, as in peft, LLaMA-Factory and unsloth: `method: {name: lora}` trains on
    the fused LoRA layers (and the fast engine's estimate); a dropout above 0 keeps peft's layers."""
    path = tmp_path / "c.yaml"
    path.write_text(f"method: {{name: {name}}}\n")
    cfg = config.load(path)
    assert cfg.method.dropout == 0.0 and select.fusable(cfg.method)
    cfg.method.dropout = 0.05
    assert not select.fusable(cfg.method)
