"""LoRA and its variants through peft: lora, dora (use_dora), rslora (use_rslora), pissa (SVD init), qlora.

PiSSA moves the principal part of each weight into the adapter, so the trained adapter only fits the
residual base; at save time it is converted (peft's path_initial_model_for_weight_conversion) into a
plain LoRA of rank 2r that loads on the original base, as every other adapter does. The initial adapter
lives in a temporary folder for as long as the model may be saved (every checkpoint converts against it):
release(model) removes it at the end of training, and a weakref.finalize on the model at its collection or
at process exit, whichever comes first.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import models
from . import experts, kinds, quant, targets
from .base import MethodError

if TYPE_CHECKING:
    from peft import LoraConfig
    from torch import nn

    from ..config import MethodConfig


def expert_parameters(model: torch.nn.Module, cfg: MethodConfig) -> list[str]:
    """The fused expert weights this config adapts (peft's target_parameters), in the layers it names."""
    names = experts.select(model, cfg.target_modules)
    if cfg.layers_to_transform:
        keep = {str(i) for i in cfg.layers_to_transform}
        names = [n for n in names if re.search(r"\.(\d+)\.", n) and re.search(r"\.(\d+)\.", n)[1] in keep]
    if names and cfg.name in ("dora", "pissa") and cfg.target_modules in ([], ["all-linear"]):
        return []  # their defaults stay on the Linear layers; the run's experts line says none are adapted
    if names and cfg.name in ("dora", "pissa"):
        raise MethodError(f"method {cfg.name}: peft adapts fused expert weights ({names[0]}...) with plain LoRA only; "
                          "use method.name=lora, or leave the experts out of method.target_modules")
    return names


def lora_config(model: nn.Module, cfg: MethodConfig) -> LoraConfig:
    from peft import LoraConfig

    target = targets.resolve(model, cfg.target_modules)
    params = expert_parameters(model, cfg)
    targets.check_layers(model, cfg.layers_to_transform)
    targets.check_modules_to_save(model, cfg.modules_to_save)
    targets.check_rank(model, target, cfg.r, params)
    routers = experts.routers(model) if cfg.train_router else []
    if cfg.train_router and not routers:
        raise MethodError(f"method.train_router: {type(model).__name__} has no mixture-of-experts router "
                          "(a gate or router module beside the experts); leave it false")
    return LoraConfig(
        target_parameters=params or None,
        # peft's LoRA on a fused weight takes no dropout (its input cannot be factored out of W + BA): apply()
        # puts the dropout back on the Linear layers alone
        lora_dropout=0.0 if params else cfg.dropout,
        task_type=kinds.task_type(model),  # None on an encoder or the user's own module
        r=cfg.r,
        lora_alpha=cfg.alpha,
        bias=cfg.bias,
        target_modules=target,
        layers_to_transform=cfg.layers_to_transform or None,
        modules_to_save=(list(cfg.modules_to_save) + routers) or None,
        use_dora=cfg.name == "dora",
        use_rslora=cfg.name == "rslora",
        # a fast randomized SVD: the residual is exact whatever the precision of the principal part (on the meta
        # device, where no SVD runs, LoRA's init: the same shapes, and the same targets, without fused experts)
        init_lora_weights="pissa_niter_16" if cfg.name == "pissa" and not _on_meta(model) else True,
    )


def _on_meta(model: nn.Module) -> bool:
    return str(next(model.parameters()).device) == "meta"


def apply(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Wrap the model with LoRA adapters; only adapters (and modules_to_save) train."""
    from peft import get_peft_model

    if cfg.name == "qlora" and not _on_meta(model):  # on the meta device (estimates, counts): LoRA's shapes
        model = quant.prepare(model, cfg.quant_bits)
    peft_model = get_peft_model(model, lora_config(model, cfg))
    if cfg.dropout and peft_model.peft_config["default"].target_parameters:
        _linear_dropout(peft_model, cfg.dropout)
    if cfg.name == "pissa" and not _on_meta(model):
        # keep the initial adapter: saving converts against it. init_lora_weights=True so that loading
        # the initial adapter later does not run the SVD again.
        peft_model.peft_config["default"].init_lora_weights = True
        init_dir = Path(tempfile.mkdtemp(prefix="slimtune-pissa-init-"))
        peft_model.save_pretrained(init_dir)
        peft_model._slimtune_pissa_init = init_dir
        # the callback holds only the path: a reference to the model would keep it alive forever
        peft_model._slimtune_pissa_release = weakref.finalize(peft_model, shutil.rmtree, init_dir, True)
    return peft_model


def _linear_dropout(model: torch.nn.Module, p: float) -> None:
    """method.dropout on the LoRA Linear layers of a model whose fused expert weights take none."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer) and not getattr(module, "parameter_name", None):
            for name in module.lora_dropout:
                module.lora_dropout[name] = torch.nn.Dropout(p)


def save(model: nn.Module, out_dir: Path, weights: dict | None = None) -> None:
    """peft's save_pretrained; PiSSA's converted against its initial adapter, which stays for later saves."""
    init_dir = getattr(model, "_slimtune_pissa_init", None)
    if init_dir is None:
        extra = {"state_dict": weights} if weights is not None else {}  # sharded: peft reads these instead
        model.save_pretrained(out_dir, safe_serialization=True, **extra)
    else:
        model.save_pretrained(out_dir, safe_serialization=True,
                              path_initial_model_for_weight_conversion=str(init_dir))
    record_loadable_base(out_dir)


def record_loadable_base(folder: Path) -> None:
    """adapter_config.json names its base by a path that `AutoPeftModelForCausalLM.from_pretrained(folder)`
    loads: for the embedded model its converted folder, absolute (models.loadable_name). Rewritten after
    peft's save: peft reads the same field during the save to find the base's config.json."""
    path = Path(folder) / "adapter_config.json"
    if not path.is_file():
        return
    adapter = json.loads(path.read_text(encoding="utf-8"))
    name = adapter.get("base_model_name_or_path")
    if name and models.loadable_name(name) != name:
        adapter["base_model_name_or_path"] = models.loadable_name(name)
        path.write_text(json.dumps(adapter, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def release(model: nn.Module) -> None:
    """Remove PiSSA's initial adapter once no save will follow (a no-op for any other model); later saves
    of this model write the unconverted adapter, which fits the residual base only."""
    done = getattr(model, "_slimtune_pissa_release", None)
    if done is not None:
        done()  # runs shutil.rmtree once and detaches the finalizer
        model._slimtune_pissa_init = model._slimtune_pissa_release = None
