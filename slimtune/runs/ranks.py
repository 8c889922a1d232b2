"""Which of torchrun's processes this one is, and what a run folder's writes and reads need of the others:
rank 0 writes, all ranks wait at a barrier, each rank takes its own part of a whole tensor (FSDP2's DTensor
shard) and gives its RNG state. One process (no process group) is rank 0 of 1, and every call is then free.
The process group itself (joining it, sharding the model) is engine/distributed.py's.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..methods.base import full


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order; [obj] in a single process."""
    if not active():
        return [obj]
    out = [None] * size()
    dist.all_gather_object(out, obj)
    return out


def local_part(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`value` (whole) as `like` holds it: this rank's shard for a DTensor, else `value` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(like, DTensor):
        return distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                                 src_data_rank=None)
    return value


def optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every sharded state whole: the format of a single process."""
    state = optimizer.state_dict()
    state["state"] = {i: {k: full(v) if isinstance(v, torch.Tensor) and v.dim() else v for k, v in s.items()}
                      for i, s in state["state"].items()}
    return state


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a single-process-format state: each whole tensor becomes this rank's shard of its parameter."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    shaped = {i: {k: local_part(v, params[i]) if isinstance(v, torch.Tensor) and v.dim() else v
                  for k, v in s.items()} for i, s in state["state"].items()}
    optimizer.load_state_dict(dict(state, state=shaped))
