"""What every method shares: the error type, freezing, parameter counts as peft reports them, and the trained
weights whole, as every save writes them."""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from ..errors import SlimtuneError


class MethodError(SlimtuneError, ValueError):
    """A method that cannot apply to this model or machine; the message says what to do instead."""


def freeze_all(model: torch.nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def trainable(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counted as peft's get_nb_trainable_parameters does (4-bit weights unpacked)."""
    trainable_n = total = 0
    for p in model.parameters():
        n = p.numel()
        if n == 0 and hasattr(p, "ds_numel"):  # pragma: no cover - deepspeed-sharded parameters
            n = p.ds_numel
        if p.__class__.__name__ == "Params4bit":  # two 4-bit values per byte of storage
            n *= 2 * (p.element_size() if hasattr(p, "element_size") else p.quant_storage.itemsize)
        total += n
        if p.requires_grad:
            trainable_n += n
    return trainable_n, total


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def on_device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one, on the CPU; a plain tensor as it is. Collective."""
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().to("cpu").contiguous().clone()


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable parameter, whole, on the CPU, by name: what checkpoints and our methods' parts
    file save (several processes, FSDP2: all ranks must call it)."""
    return {n: full(p) for n, p in model.named_parameters() if p.requires_grad}
