"""Which fast paths a run takes: every train.* kernel key decided here, once, into one frozen `Kernels`
record that the training step, the evaluation and the memory estimator read. Adding a kernel means this
module and its config key (the op itself in its own kernels/<op>.py)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import Config, ConfigError, MethodConfig, TrainConfig
from . import attention, compiled, expert_lora, lora, norm_mlp, rope, tiled_mlp

if TYPE_CHECKING:
    from ..config import Config, TrainConfig

MIN_HIDDEN = 3072  # H100, LoRA r=16, 16 records a step: 8B (hidden 4096) +15% tok/s, 1B (2048) -7% (CPU-bound)
# train.tiled_mlp=auto slices the MLP of micro-batches past this many tokens. Below it one layer's MLP
# intermediates (3 x tokens x intermediate x 2 bytes: 1.3 GiB at 8B and 16k tokens) are small beside the
# weights and the other activations, and tiling costs one more MLP forward a step (the recompute: about +20%
# FLOPs at short lengths, estimated in kernels/tiled_mlp.py): it pays only where memory limits the run. At
# 16,384 it caught bench/speed.py's 16 x 1,024-token micro-batch (packed rows hold ~16.4k tokens) and the 1B
# defaults ran at 10.2k tok/s on an H200 with 139 GiB free (2026-12-03). At 65,536 it left whole the records it
# is for: 8B LoRA r=32 under a 24 GiB cap (H100, bench/long_context.py, 2026-12-06) trained 29,696 tokens and ran
# out of memory at 33,792 on one tokens x intermediate tensor (924 MiB), its peak growing 216 KB a token, where
# sliced records grow about 115 KB a token (8B QLoRA from 139,264 to 147,456 tokens). 24,576 is above that
# micro-batch with room and below the longest record that trained whole there. Where a batch split the plan
# chose (engine/split.py) fits with the MLP whole, its run leaves it whole (up to split.WHOLE_TOKENS a micro-batch).
TILE_TOKENS = 24576
LORA_METHODS = ("lora", "rslora", "pissa", "qlora")  # peft's plain LoRA layers, the ones kernels/lora.py fuses


@dataclass(frozen=True)
class Kernels:
    """What is on. Counts are the modules each kernel took (enable); in the estimator's record, which has
    no model, 1 stands for "on"."""
    packing: str = "off"  # bins | rows | off
    chunked_loss: bool = False  # head + cross-entropy a chunk of rows at a time (engine/loss.py)
    fused_lora_layers: int = 0
    fused_expert_layers: int = 0  # experts modules whose LoRA on fused weights runs per expert (kernels/expert_lora.py)
    fused_norm_mlp: int = 0
    fused_rope: int = 0
    tiled_mlp: int = 0  # MLPs sliced over the sequence, in forwards of more than TILE_TOKENS tokens under auto
    compiled_layers: int = 0  # decoder layers whose training forward runs through torch.compile

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __getitem__(self, key: str):
        """A dict's view (kernels["packing"]), as fit's result and the bench scripts read it."""
        return getattr(self, key)

    @property
    def fast(self) -> bool:
        """The fast engine memory.py's fast model describes: packed rows, chunked loss, fused LoRA."""
        return self.packing != "off" and self.chunked_loss and self.fused_lora_layers > 0


def use_packing(mode: str, model: torch.nn.Module, device: str) -> str | None:
    """How micro-batches are packed: "bins" (records fill rows of micro_batch_size x max_len tokens), "rows"
    (micro_batch_size records per row, as unpacked) or None. train.packing=auto packs in rows on CUDA where
    packed rows are exact for the model: rows keep train.batch_size records per optimizer step (bins hold as
    many as fit, so a step's record count follows the lengths: 2 bins of 8 x 1,024 tokens took 46 records a step
    instead of 16 on the bench workload, 2026-12-03); train.packing=on asks for bins. On the CPU auto stays off:
    padding costs less there than on a GPU, and the per-record attention fallback (kernels/reference.py) is not
    measured faster than one padded batch."""
    if mode == "off":
        return None
    why = attention.unsupported(model)
    if mode in ("on", "rows") and why:
        raise ConfigError(f"train.packing={mode}: {why}; set train.packing=auto or off")
    if why is not None or (mode == "auto" and not device.startswith("cuda")):
        return None
    return "bins" if mode == "on" else "rows"


def use_chunked_loss(mode: str, device: str) -> bool:
    """train.loss: chunked computes head + cross-entropy a chunk of rows at a time (kernels/linear_ce.py);
    auto does so on CUDA, where the full-vocabulary logits are most of the memory; plain otherwise."""
    return mode == "chunked" or (mode == "auto" and device.startswith("cuda"))


def use_fused_lora(mode: str, device: str) -> bool:
    """train.fused_lora: one autograd node per LoRA layer (kernels/lora.py), and LoRA on fused expert weights per
    expert (kernels/expert_lora.py); auto on CUDA, where peft's chain of small ops leaves the GPU waiting on the
    CPU and its W + BA of a whole expert stack is the slow part (Qwen3-30B-A3B QLoRA on an H200: 3,995 tok/s per
    expert against 2,974 through peft, at less memory)."""
    return mode == "on" or (mode == "auto" and device.startswith("cuda"))


def wanted(key: str, mode: str, device: str) -> bool:
    """A Liger kernel's train.<key>: on (CUDA only: an error elsewhere), off, or auto (CUDA with Liger installed)."""
    cuda = device.startswith("cuda")
    if mode == "on" and not cuda:
        raise ConfigError(f"train.{key}=on: Liger's kernels are Triton, CUDA only; use auto or off on {device}")
    return mode == "on" or (mode == "auto" and cuda and norm_mlp.available())


def chosen(mode: str, device: str, hidden: int) -> bool:
    """train.fused_norm_mlp: auto also wants the model wide enough that the GPU, not the CPU, sets the pace."""
    return wanted("fused_norm_mlp", mode, device) and (mode == "on" or hidden >= MIN_HIDDEN)


def use_fused_norm_mlp(mode: str, device: str, model: torch.nn.Module | None = None) -> bool:
    """train.fused_norm_mlp: Liger's RMSNorm and SwiGLU (kernels/norm_mlp.py). auto: on CUDA with Liger
    installed, for models whose hidden size is at least MIN_HIDDEN (where it was measured to pay)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", 0) or 0
    return chosen(mode, device, hidden)


def use_fused_rope(mode: str, device: str) -> bool:
    """train.fused_rope: Liger's RoPE kernel in this model's attention (kernels/rope.py). auto: on CUDA with
    Liger installed (H100, 16 records/step: +18% tokens/s at 1B, +17% at 8B, the same peak; bench/results)."""
    return wanted("fused_rope", mode, device)


def tiled_mlp_from(mode: str, device: str) -> int | None:
    """train.tiled_mlp: the token count past which a forward's MLP is sliced (kernels/tiled_mlp.py), or None
    for off. on: every forward of more than one slice, on any device; auto: CUDA, one process, past TILE_TOKENS."""
    if mode == "on":
        return 0
    # not yet under FSDP2 (auto): the slices' backward accumulates straight into .grad, around the hooks
    # that reduce-scatter sharded gradients, and no multi-GPU run has checked it
    sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
    return TILE_TOKENS if mode == "auto" and device.startswith("cuda") and not sharded else None


def use_compile(mode: str, device: str, beside_liger: int = 0) -> bool:
    """train.compile: each decoder layer through torch.compile (kernels/compiled.py). auto: CUDA with Triton, one
    process (not yet measured under FSDP2), and not beside Liger's norm/MLP kernels (`beside_liger`: the modules
    fused_norm_mlp took; auto takes those at hidden >= 3072): dynamo failed on Liger's autograd Functions inside
    checkpointed layers at 8B (H100, 2026-11-23), and Liger's kernels already fuse what compile would there.
    Measured: 1B, 16 records a step, H100 21.4k tok/s compiled vs 17.5k eager (2026-11-23); H200 11.9k vs 9.9k
    with half the layers compiled (the rest hit the recompile limit, since fixed; 2026-12-03)."""
    if mode == "off":
        return False
    sharded = torch.distributed.is_available() and torch.distributed.is_initialized()
    return mode == "on" or (device.startswith("cuda") and compiled.available() and not sharded and not beside_liger)


def _tile(model: torch.nn.Module, tc: TrainConfig, device: str) -> int:
    past = tiled_mlp_from(tc.tiled_mlp, device)
    return tiled_mlp.enable(model, past) if past is not None else 0


def fallbacks(model: torch.nn.Module, tc: TrainConfig, device: str, k: Kernels, want: Kernels) -> list[str]:
    """One line for each fast path train.* asks for on this device that this model keeps out of, with why
    (`want`: what enable was asked for, the run plan's record, which leaves the MLP whole where it fits unsliced)."""
    name, out = type(attention._base(model)).__name__, []
    why = attention.unsupported(model)
    if k.packing == "off" and why and (tc.packing == "auto" and device.startswith("cuda")):
        out.append(f"train.packing=auto: records padded, not packed: {why}")
    asked = (("fused_norm_mlp", k.fused_norm_mlp, use_fused_norm_mlp(tc.fused_norm_mlp, device, model),
              "Llama-style RMSNorm or SwiGLU MLP"),
             ("fused_rope", k.fused_rope, use_fused_rope(tc.fused_rope, device), "Llama-style attention with RoPE"),
             ("tiled_mlp", k.tiled_mlp, tiled_mlp_from(tc.tiled_mlp, device) is not None and bool(want.tiled_mlp),
              "Llama-style MLP (gate_proj, up_proj, down_proj)"),
             ("compile", k.compiled_layers, use_compile(tc.compile, device), "transformers decoder layers"))
    for key, took, wanted_here, what in asked:
        if key == "compile" and wanted_here and not took and compiled.parametrized(model):
            out.append(f"train.compile={tc.compile}: layers left eager: peft's LoRA on fused expert weights registers "
                       "a parametrization at each forward, which torch.compile cannot trace")
        elif key == "compile" and wanted_here and not took and compiled.grouped_experts(model):
            out.append(f"train.compile={tc.compile}: layers left eager around the per-expert LoRA path: inductor's "
                       "code for its grouped matmuls failed on an H200 (torch 2.11: invalid strides); eager it is "
                       "peft's within 1e-5")
        elif key == "compile" and wanted_here and not took and k.fused_norm_mlp:
            out.append("train.compile=auto: layers left eager beside Liger's norm/MLP kernels (dynamo failed on them "
                       "inside checkpointed layers; set train.compile=on to try, or fused_norm_mlp=off)")
        elif key == "compile" and wanted_here and not took and (n := compiled.unfused_4bit(model)):
            out.append(f"train.compile={tc.compile}: layers left eager: {n} 4-bit layers run bitsandbytes' own "
                       "forward (no LoRA on them, or LoRA the fused node does not take), which compiled layers were "
                       "not checked with (LoRA on every linear layer with method.dropout=0 takes the node)")
        elif wanted_here and not took:
            out.append(f"train.{key}={getattr(tc, key)}: {name} has no {what}; its own forward runs")
    return out


def choose(tc: TrainConfig, device: str, hidden: int = 0, moe: bool = False) -> Kernels:
    """The fast paths train.* asks for on `device` for a model `hidden` wide (`moe`: a mixture of experts),
    decided once per run (the run plan's record: 1 stands for "on"; enable then says what each took in a given
    model). train.fused_lora also takes LoRA on fused expert weights (kernels/expert_lora.py)."""
    liger = chosen(tc.fused_norm_mlp, device, hidden)
    # a preference objective packs each micro-batch's chosen and rejected sequences into one row, GRPO each
    # micro-batch's prompts + completions (never bins: a step's records are its pairs or prompts)
    packing = "off"
    if tc.packing != "off" and (tc.packing != "auto" or device.startswith("cuda")):
        packing = "bins" if tc.packing == "on" and tc.objective == "sft" else "rows"
    fused = use_fused_lora(tc.fused_lora, device)
    return Kernels(packing=packing, chunked_loss=use_chunked_loss(tc.loss, device), fused_lora_layers=int(fused),
                   fused_expert_layers=int(moe and fused), fused_norm_mlp=int(liger),
                   fused_rope=int(use_fused_rope(tc.fused_rope, device)),
                   tiled_mlp=int(tiled_mlp_from(tc.tiled_mlp, device) is not None),
                   compiled_layers=int(use_compile(tc.compile, device, int(liger))))


def enable(model: torch.nn.Module, tc: TrainConfig, device: str, log: Callable[[str], None] = print,
           want: Kernels | None = None) -> Kernels:
    """Switch on in `model` the fast paths `want` chose (default: choose for this model's width); what each
    took, and through `log` one line for each asked-for path this model falls back from. disable takes them
    all back."""
    if want is None:
        want = choose(tc, device, getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    packed = use_packing(tc.packing, model, device) if want.packing != "off" else None
    packed = want.packing if packed else None  # bins only where choose chose them (a preference objective: rows)
    try:
        if packed:
            attention.enable(model)
        liger = norm_mlp.enable(model) if want.fused_norm_mlp else 0
        took = Kernels(packing=packed or "off", chunked_loss=want.chunked_loss,
                       fused_lora_layers=lora.enable(model, log) if want.fused_lora_layers else 0,
                       fused_expert_layers=expert_lora.enable(model, log) if want.fused_lora_layers else 0,
                       fused_norm_mlp=liger,
                       fused_rope=rope.enable(model) if want.fused_rope else 0,
                       tiled_mlp=_tile(model, tc, device) if want.tiled_mlp else 0,  # after norm_mlp: it slices
                       compiled_layers=compiled.enable(model, log) if want.compiled_layers else 0)  # Liger's MLP
        for line in fallbacks(model, tc, device, took, want):
            log(f"fast path off: {line}")
        return took
    except Exception:
        disable(model)  # a refused key leaves the model as it came
        raise


def disable(model: torch.nn.Module) -> None:
    compiled.disable(model)  # first: it holds the layers' forwards as the other kernels left them
    tiled_mlp.disable(model)  # first: it gives back the forward norm_mlp bound
    lora.disable(model)
    expert_lora.disable(model)
    norm_mlp.disable(model)
    rope.disable(model)
    attention.disable(model)


def on_gpu(cfg: Config, hidden: int = 0) -> Kernels:
    """What `train` on a GPU would choose for this config, without a model (the memory estimator's record):
    packing unless off, chunked loss unless plain, fused LoRA for plain LoRA without dropout (qlora's over a
    4-bit base too, not 8-bit), Liger's norm and MLP as chosen() decides it for this hidden size."""
    tc = cfg.train
    packing = "off" if tc.packing == "off" or tc.objective != "sft" else ("bins" if tc.packing == "on" else "rows")
    fused = fusable(cfg.method) and tc.fused_lora != "off"
    return Kernels(packing=packing, chunked_loss=tc.loss != "plain", fused_lora_layers=int(fused),
                   fused_norm_mlp=int(chosen(tc.fused_norm_mlp, "cuda", hidden)))


def fusable(method: MethodConfig) -> bool:
    """Whether kernels/lora.py fuses this method's layers: plain LoRA without dropout (qlora's over a 4-bit
    base too, not 8-bit); others keep peft's layers whatever train.fused_lora asks."""
    return method.name in LORA_METHODS and method.dropout == 0 and not (method.name == "qlora" and
                                                                      method.quant_bits != 4)
