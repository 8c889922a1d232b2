"""Our methods' artifact (full, freeze, bitfit): only the trained parameters, by name, in safetensors
(slimtune_parts.safetensors). It lives with the methods that write it; export/merge and load_run read it.

Base + parts restores the trained model exactly; `slimtune merge` writes it out as a plain model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import DamagedFileError, MismatchError
from .base import trainable_state

PARTS = "slimtune_parts.safetensors"


def save(model: torch.nn.Module, out_dir: Path, weights: dict | None = None) -> None:
    """weights: the trained parameters whole, when the model's own are sharded over several processes."""
    state = weights if weights is not None else trainable_state(model)
    save_file(state, str(Path(out_dir) / PARTS), metadata={"format": "pt", "writer": "slimtune"})


def load(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """Copy the saved parameters into the base model in place; every saved name must exist in it."""
    try:
        state = load_file(str(Path(folder) / PARTS))
    except SafetensorError as err:
        raise DamagedFileError(f"{Path(folder) / PARTS}: not a readable safetensors file ({err}); it was cut short "
                               "or damaged: restore it or train the run again") from None
    params = dict(base.named_parameters())
    unknown = sorted(set(state) - set(params))
    if unknown:
        raise MismatchError(f"{folder / PARTS}: parameters not in the base model: {', '.join(unknown[:5])}; "
                            "was it trained on another model?")
    with torch.no_grad():
        for name, value in state.items():
            if params[name].shape != value.shape:
                raise MismatchError(f"{folder / PARTS}: {name} has shape {tuple(value.shape)}, the base model "
                                    f"{tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
    return base
