"""The run plan: what a run decides when it starts, decided once into one frozen record: the device and the
processes, the batch split (micro-batch, accumulation, checkpointing, offload), the dtypes, the fast paths and
the loss. The loop, the memory estimator, the in-training evaluation, `slimtune.fit`, `slimtune estimate` and
the web app read it; `describe()` is the text each of them prints."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import Config
from ..kernels import select
from ..kernels.select import Kernels
from ..methods import experts
from ..models import load_config
from . import distributed, precision, split
from .precision import Dtypes
from .split import CPU_MICRO, Sizes, Split

FAST_PATHS = (("fused_lora_layers", "fused LoRA layers"), ("fused_expert_layers", "fused expert LoRA"),
              ("fused_norm_mlp", "Liger norm/MLP"),
              ("fused_rope", "Liger RoPE"), ("tiled_mlp", "tiled MLP"), ("compiled_layers", "compiled layers"))


@dataclass(frozen=True)
class RunPlan:
    """What a run trains with, resolved from the config, the model's shape, the records and the device."""
    device: str  # cpu | cuda | cuda:N (this process's GPU under torchrun)
    split: Split  # train.batch_size as micro_batch_size x grad_accum, and why (engine/split.py)
    precision: Dtypes  # dtypes of the frozen base, the trainable weights and autocast; fp16 loss scaling
    kernels: Kernels  # the fast paths chosen (1 stands for "on"; what each took in the model is fit's result)
    checkpointing: bool  # activations recomputed in backward (prefix_tuning trains without, whatever is asked)
    world_size: int = 1  # processes (torchrun); over 1 the model is sharded with FSDP2
    rank: int = 0
    notes: tuple[str, ...] = ()  # settings the plan could not honour as asked, one line each

    @property
    def batch_size(self) -> int:
        return self.split.batch_size

    @property
    def micro_batch_size(self) -> int:
        return self.split.chosen.micro_batch_size

    @property
    def grad_accum(self) -> int:
        return self.split.chosen.grad_accum

    @property
    def offload(self) -> bool:
        """Saved activations (with checkpointing: each layer's input) kept in CPU memory (engine/offload.py)."""
        return self.split.chosen.offload_activations

    @property
    def packing(self) -> str:
        return self.kernels.packing

    @property
    def chunked_loss(self) -> bool:
        """The head and cross-entropy a chunk of rows at a time (engine/loss.py), in training and evaluation."""
        return self.kernels.chunked_loss

    @property
    def fsdp(self) -> bool:
        return self.world_size > 1

    def apply(self, cfg: Config) -> Config:
        """cfg with the split written into train.* as numbers: what the run trains with and its config.yaml holds."""
        return self.split.apply(cfg)

    def describe(self) -> str:
        """The plan as `slimtune train`, `slimtune.fit`, `slimtune estimate` and the web app print it."""
        p = self.precision
        dtypes = f"base {_dtype(p.weights)}, trainable {_dtype(p.trainable)}" + (
            f", autocast {_dtype(p.autocast)}" if p.autocast else "") + (", loss scaling" if p.scaler else "")
        where = f"{self.device}, {self.world_size} processes (FSDP2)" if self.fsdp else f"{self.device}, 1 process"
        memory_mode = "checkpointing " + ("on" if self.checkpointing else "off") + (
            ", activations offloaded to CPU memory" if self.offload else "")
        fast = [name for key, name in FAST_PATHS if getattr(self.kernels, key)]
        lines = [self.split.describe(),
                 f"run plan: {where}; precision {p.name} ({dtypes}); {memory_mode}",
                 f"  loss {'chunked' if self.chunked_loss else 'plain'}; packing {self.packing}; fast paths: "
                 + (", ".join(fast) or "none")]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _dtype(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _shape(cfg: Config, model: torch.nn.Module | None) -> tuple[int, bool]:
    """The model's hidden size (the fused norm/MLP's choice reads it) and whether it is a mixture of experts
    (fused expert LoRA): the model's own config, or model.path's."""
    mcfg = getattr(model, "config", None) if model is not None else None
    if mcfg is None:
        try:
            mcfg = load_config(cfg.model.path, cfg.model.trust_remote_code)
        except Exception:  # a model built in code may have no folder behind model.path: no width, no Liger
            return 0, False
    moe = bool(experts.per_layer(mcfg))
    return int(getattr(mcfg, "hidden_size", 0) or 0), moe


def resolve(cfg: Config, device: str, *, model: torch.nn.Module | None = None, sizes: Sizes | None = None,
            free: float | None = None, world_size: int | None = None, rank: int | None = None) -> RunPlan:
    """The plan of a run of `cfg` on `device`, the one place it is decided.

    Args:
        model: the model to train, when already built (its config gives the shape the estimate reads).
        sizes: (length, trained tokens) of the training records, longest first: an auto split is fitted to
            the longest; None: micro-batches of data.max_len tokens.
        free: GPU bytes the run may use (default: what the GPU has free, the least over the processes).
        world_size, rank: the processes (default: torchrun's, engine/distributed.py).
    """
    dtypes = precision.choose_dtypes(cfg.train.precision, device, cfg.train.adam_eps)
    return _build(cfg, device, dtypes, model, sizes, free, world_size, rank)


def _build(cfg: Config, device: str, dtypes: Dtypes, model: torch.nn.Module | None, sizes: Sizes | None,
           free: float | None, world_size: int | None, rank: int | None, chosen: Split | None = None) -> RunPlan:
    world = distributed.size() if world_size is None else world_size
    kernels = select.choose(cfg.train, device, *_shape(cfg, model))
    chosen = chosen or split.split(cfg, device, free, sizes, world, model, kernels, dtypes)
    if chosen.whole_mlp:  # its micro-batches fit with the MLP unsliced (split._whole_mlp)
        kernels = replace(kernels, tiled_mlp=0)
    checkpointing, notes = chosen.chosen.gradient_checkpointing, ()
    if cfg.method.name == "prefix_tuning" and checkpointing:
        checkpointing, notes = False, ("train.gradient_checkpointing is off for prefix_tuning: checkpointed layers "
                                       "would drop the learned prefix (its keys/values travel as a KV cache)",)
    return RunPlan(device, chosen, dtypes, kernels, checkpointing, world,
                   distributed.rank() if rank is None else rank, notes)


def for_estimate(cfg: Config, budget: float | None, sizes: Sizes | None = None, gpus: int = 1) -> RunPlan:
    """`slimtune estimate` and the web app's estimate: the plan of the run `train` starts with this config. On a
    GPU (what memory is estimated for) unless train.device=cpu: one of `budget` bytes when given, else this
    machine's; with neither, an auto split takes the CPU's rule and says how to ask for a GPU's."""
    device = "cpu" if cfg.train.device == "cpu" and budget is None and gpus <= 1 else \
        cfg.train.device if cfg.train.device.startswith("cuda") else "cuda"
    if device == "cpu" or torch.cuda.is_available():
        dtypes = precision.choose_dtypes(cfg.train.precision, device, cfg.train.adam_eps)
        return _build(cfg, device, dtypes, None, sizes, budget, gpus, 0)
    chosen = None
    if budget is None and split.is_auto(cfg.train):
        chosen = split.on_cpu(cfg, f"no GPU here and no --budget: the CPU's rule (at most {CPU_MICRO} records "
                                   "a micro-batch); pass --budget N (the GPU's GiB) for the split train picks on "
                                   "that GPU")
    return _build(cfg, device, precision.gpu_dtypes(cfg.train), None, sizes, budget, gpus, 0, chosen)
