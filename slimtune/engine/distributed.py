"""Several processes (GPUs, machines) through torchrun and FSDP2: PyTorch's own engine, not a scheme of ours.

`torchrun --nproc_per_node N -m slimtune train CONFIG` starts N copies of the same run. Each one:
- joins the process group (NCCL on CUDA, gloo on the CPU) and takes the GPU of its LOCAL_RANK;
- shards the model with `fully_shard`: one unit per decoder layer plus the root, so the frozen base,
  the trainable parameters, their gradients and AdamW state are all split N ways. No parameter is cast
  by FSDP: trainable parameters stay in their own dtype (fp32 by default) and autocast computes as on
  one GPU, so gradients are reduced in fp32 and the numbers match a single process;
- takes its share of every micro-batch, split by tokens (not by count), so the records per optimizer
  step are the config's whatever N is, and the loss is divided by the global count of trained tokens;
- writes logs, checkpoints and the final adapter from rank 0 only, from full tensors gathered from all
  ranks, in the very formats of a single process (so a checkpoint resumes on any number of processes).
"""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import ConfigError, TrainConfig
from ..data.stream import split  # noqa: F401 - the loop's split of a micro-batch; memory.py models it
from ..errors import SlimtuneError
from ..methods.base import trainable_state
# which process this is and the rank-0 saves' collectives: runs/ranks.py, below the engine, as checkpoints need them
from ..runs.ranks import (active, all_gather_object, barrier, is_main, load_optimizer_state, local_part,  # noqa: F401
                          optimizer_state, rank, size)


class ShardingError(SlimtuneError, ValueError):
    """An FSDP2 setting this number of processes cannot take; the message names the setting."""


# methods that cannot train sharded yet: the reason, and what to use instead
UNSUPPORTED = {
    "pissa": "PiSSA's save converts its adapter against an initial copy that FSDP2 does not shard; "
             "train it on one GPU (train.gpus=1), or use lora",
    # FSDP2 shards a parameter by splitting its elements; bitsandbytes packs two 4-bit weights per uint8 byte
    # with per-block scales in a side object, so a shard is no longer a weight. With the default uint8
    # storage accelerate's FSDP2 path crashed or silently trained to loss 0 with NaN gradients
    # (huggingface/accelerate#3983); bnb_4bit_quant_storage set to the compute dtype is the documented way
    # around it, but slimtune has no GPU-tested loss curve for it, so it is refused rather than trusted.
    "qlora": "a bitsandbytes 4-bit base is not sharded by FSDP2 in slimtune: its weights are packed two per uint8 "
             "byte, and with that storage accelerate's FSDP2 path crashed or trained to loss 0 with NaN gradients "
             "(accelerate#3983); a 4-bit base stored in the compute dtype (bnb_4bit_quant_storage) has no tested "
             "loss curve here yet. Across GPUs use method.name=lora on a bf16 base (train.precision=bf16: the "
             "base is sharded, so each GPU holds 1/N of it), or keep qlora and set train.gpus=1"}


def launched() -> bool:
    """Started by torchrun (or another launcher that sets WORLD_SIZE) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str, timeout_minutes: float = 30.0) -> str:
    """Join the process group; returns this process's device ("cuda:<local rank>" or "cpu"). A rank that
    dies makes the others fail at their next collective instead of waiting past `timeout_minutes`."""
    if not launched() or active():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()




def layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder layers: modules of the classes transformers keeps whole (_no_split_modules), else the
    children of the largest ModuleList."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        return []
    biggest = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
    return list(biggest)


def reshard_after_forward(group: int, world: int) -> bool | int:
    """train.fsdp_reshard as FSDP2 takes it: 0 (or the GPU count) = True, 1 = False, else the group size."""
    if group in (0, world):
        return True
    if group == 1:
        return False
    if group < 0 or world % group:
        raise ShardingError(f"train.fsdp_reshard={group}: must be 0 (all {world} GPUs), 1 (layers kept whole) or a "
                            f"divisor of the GPU count ({world}), e.g. 8 for the GPUs of one node")
    return group


def shard(model: torch.nn.Module, device: str, reshard: int = 0, prefetch: int = 0) -> torch.nn.Module:
    """FSDP2 over the whole model: each decoder layer its own unit, then the root (embeddings, head,
    prompt encoders). Parameters move to `device` one unit at a time, so a model loaded on the CPU
    never sits whole on one GPU. No parameter is cast (autocast computes as on one GPU; trainable
    parameters keep their fp32 master copy) and gradients are reduced in fp32 whatever train.precision.

    Args:
        reshard: GPUs a layer's weights are spread over between its forward and its backward
            (train.fsdp_reshard): 0 = all of them (least memory, a second all-gather in backward);
            1 = kept whole (one all-gather per step, the whole model's memory on every GPU);
            N = groups of N (the backward all-gather stays within N GPUs, e.g. one node).
        prefetch: all-gather the next N layers explicitly, in forward and in backward
            (train.fsdp_prefetch); 0 = FSDP2's own (implicit forward, one layer ahead in backward).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.split(":")[0], (size(),))
    after = reshard_after_forward(reshard, size())
    # the -pure modes' half gradients are summed in fp32: a sum over N GPUs can pass fp16's 65504 where no part does
    policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    units = layers(model)
    for layer in units:
        fully_shard(layer, mesh=mesh, reshard_after_forward=after, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for i, layer in enumerate(units if prefetch else []):
        layer.set_modules_to_forward_prefetch(units[i + 1:i + 1 + prefetch])
        layer.set_modules_to_backward_prefetch(units[max(0, i - prefetch):i][::-1])
    return model


def all_sum(values: list[float], device: str) -> list[float]:
    """Element-wise sum over ranks (float64: token counts stay exact)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum a device tensor over ranks in place, without reading it (nothing to do in one process)."""
    if active():
        dist.all_reduce(t)
    return t


def all_max(values: list[float], device: str) -> list[float]:
    """Element-wise maximum over ranks (the busiest GPU's peak)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the gradients to max_norm (inf: only measure); the norm over all ranks' shards, a device
    tensor that nothing has read (the step reads it with its loss)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[dict | None]:
    """For a save from rank 0: yields every trainable parameter whole (None in a single process). Prompt
    methods compute what they save (peft's prompt embeddings) from the root unit's parameters, so the
    root is also unsharded for the duration; it holds embeddings and head only, never the layers."""
    if not active():
        yield None
        return
    weights = trainable_state(model)
    prompt = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    if prompt:
        model.unshard()
    try:
        yield weights
    finally:
        if prompt:
            model.reshard()


def _silent(*args: object, **kwargs: object) -> None:
    """The log of a rank that is not rank 0: rank 0 speaks for the run."""


@dataclass(frozen=True)
class Processes:
    """A run's processes behind one object, as Lightning Fabric's: the recipe asks `is_main`, waits at
    `barrier`, reduces with `all_reduce`; a single process (rank 0 of 1) answers each call itself."""
    device: str  # this process's device ("cuda:<local rank>" under torchrun)
    rank: int = 0
    world_size: int = 1

    @classmethod
    def start(cls, device: str) -> Processes:
        """Join torchrun's process group when launched with several processes; `device` becomes this rank's."""
        device = init(device)
        return cls(device, rank(), size())

    @property
    def is_main(self) -> bool:
        """Rank 0, which speaks for the run and owns its folder."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    @property
    def load_device(self) -> str:
        """Where the model loads: several processes load on the CPU, and each layer moves to the GPU as
        FSDP2 shards it."""
        return "cpu" if self.several else self.device

    def barrier(self) -> None:
        barrier()

    def all_reduce(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes."""
        return all_sum(values, self.device)

    def broadcast(self, obj: object) -> object:
        """Rank 0's `obj` (picklable) on every process."""
        return all_gather_object(obj)[0]

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """`log` on rank 0, nothing elsewhere."""
        return log if self.is_main else _silent

    def refuse(self, method: str) -> None:
        """A method that cannot train sharded stops the run here, on every process, with why."""
        why = UNSUPPORTED.get(method) if self.several else None
        if why:
            raise ConfigError(f"method.name={method} on {self.world_size} processes: {why}")

    def shard(self, model: torch.nn.Module, tc: TrainConfig, log: Callable[[str], None]) -> torch.nn.Module:
        """The model sharded with FSDP2 over the processes per train.fsdp_* (as it is in one process)."""
        if not self.several:
            return model
        model = shard(model, self.device, tc.fsdp_reshard, tc.fsdp_prefetch)
        log(f"FSDP2: {self.world_size} processes, {len(layers(model))} layer units + the root; "
            f"{tc.batch_size} records per optimizer step over all of them")
        return model

    def gathered(self, model: torch.nn.Module) -> contextlib.AbstractContextManager[dict | None]:
        """Every trainable parameter whole for rank 0's save (None in one process); see gathered()."""
        return gathered(model)
