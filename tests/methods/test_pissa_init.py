"""PiSSA's initial adapter (methods/lora.py): every save converts against it and leaves it for the next one;
release() at the end of training, or the model's collection, removes it."""
from __future__ import annotations

import gc
import json
import tempfile

from conftest import lora_run_config, make_model
from slimtune import config, methods
from slimtune.methods import lora
from slimtune.train import from_config as train_run


def _pissa(vocab: int = 100):
    cfg = config.MethodConfig(name="pissa", r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    return methods.apply(make_model(vocab), cfg)


def test_saves_keep_the_initial_adapter_until_release(tmp_path):
    model = _pissa()
    init = model._slimtune_pissa_init
    assert (init / "adapter_config.json").exists()
    for name in ("a", "b"):  # a checkpoint, then another: both converted to rank 2r
        lora.save(model, tmp_path / name)
        assert json.loads((tmp_path / name / "adapter_config.json").read_text())["r"] == 8, name
        assert init.exists(), name
    lora.release(model)
    assert not init.exists() and model._slimtune_pissa_init is None
    lora.release(model)  # twice is harmless, as for a model that is not PiSSA
    lora.release(make_model(100))


def test_collected_model_takes_its_initial_adapter_along():
    model = _pissa()
    init = model._slimtune_pissa_init
    del model
    gc.collect()
    assert not init.exists()


def test_train_leaves_no_initial_adapter_behind(tmp_path, tiny_model_dir, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    cfg = lora_run_config(tmp_path, tiny_model_dir, "run", method={"name": "pissa", "dropout": 0.0},
                          max_steps=2, save_every=1)
    train_run(config.load(cfg), show_progress=False, log=lambda *a: None)
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["r"] == 8
    assert not list(scratch.glob("slimtune-pissa-init-*"))
