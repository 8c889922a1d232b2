"""Peak GPU memory predicted from the config alone: the model is built on the meta device from config.json.

The peak is the larger of two moments of a step:
- end of forward / start of backward: weights + trainable + AdamW state + gradients (if accumulating)
  + activations saved for backward + the loss's logits (fp32 copies over the trained positions);
- the optimizer step: weights + trainable + state + gradients + AdamW's foreach temporaries.
Activation bytes per token per layer are proportional to (hidden + intermediate) with a coefficient per method
family, measured on an H100 (bench/memory_grid.py, 2026-11-23; bench/check_estimator.py compares every cell).
Allocator slack (reserved - allocated) and the CUDA context are added on top.

LoRA on the fast engine (CUDA's default: packed rows, chunked loss, fused LoRA layers, Liger's norm/MLP where auto
takes it, optionally offloaded layer inputs, counted as `host`) has its own model, fitted on
bench/results/2026-11-23-h100-memory_grid_fast.jsonl: real tokens (no padding), one chunk of logits at a time,
the peak the larger of the loss moment and a layer's backward.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from .. import methods
from ..config import Config, ConfigError
from ..config.batch import with_split
from ..kernels import linear_ce, select, tiled_mlp
from ..models import load_config
from . import distributed, fsdp_memory, moe_memory, precision
from .pair_logps import pair_rows

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 2 ** 30
BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}
# bytes saved for backward per token per layer, per (hidden + intermediate) element, bf16/fp16 base.
# lora-like: peft casts each adapted layer's input to fp32 and saves it; full/freeze: Linear inputs in
# the compute dtype; prompt methods: only what the frozen layers need to pass gradients through.
LAYER_COEF = {"lora": 12.2, "qlora": 10.5, "ia3": 9.0, "prompt": 8.2, "full": 13.4, "freeze": 22.8}
LOGIT_BYTES = 10.4  # per trained position x vocab: bf16 head output, its fp32 copy, log-softmax for backward
CKPT_INPUT = 1.0  # checkpointing keeps each layer's input: hidden x dtype bytes (x this factor)
ALLOC_SLACK = 0.08  # reserved beyond allocated at the peak, as a fraction of the transient memory
ALLOC_SLACK_CKPT = 0.22  # the same with checkpointing on the padded engine (recompute fragments more)
ALLOC_SLACK_CAP = 3 * GIB  # the slack stops growing past this (expandable segments map what is used)
CUDA_CONTEXT = 0.5 * GIB  # driver + kernels, outside PyTorch's allocator
FSDP_STEP_EXTRA = 0.5  # several GPUs: the sharded AdamW step's temporaries, x the single-GPU term (fitted)
# the fast engine (LoRA): bytes per token per layer per (hidden + intermediate) element saved without
# checkpointing (fused LoRA layers keep the compute-dtype input; Liger's SwiGLU keeps gate and up only)
FAST_LAYER_COEF, FAST_LAYER_COEF_LIGER = 10.6, 8.3
FAST_LOGIT_BYTES = 10.0  # per row of a loss chunk x vocab: fp32 logits, their softmax grad, the bf16 head output
FAST_FINAL_HIDDEN = 16.0  # per token x hidden at the loss: the final norm's fp32 copies and the rows picked
FAST_BACKWARD = 20.0  # per token x hidden in a layer's backward: gradient buffers of the hidden state
FAST_CONST = 0.04 * GIB


@dataclass
class Estimate:
    weights: float = 0.0  # frozen base (4-bit/8-bit for qlora)
    trainable: float = 0.0  # trainable parameters (fp32 by default)
    gradients: float = 0.0
    optimizer: float = 0.0  # AdamW exp_avg + exp_avg_sq
    activations: float = 0.0  # saved for backward, with the configured checkpointing
    activations_other: float = 0.0  # the same with checkpointing toggled (for comparison)
    logits: float = 0.0  # loss over the trained positions
    optimizer_step_extra: float = 0.0  # foreach temporaries during the AdamW step
    gathered: float = 0.0  # several GPUs (FSDP2): whole layers and the root gathered while they compute
    allocator: float = 0.0  # reserved - allocated slack
    cuda_context: float = CUDA_CONTEXT
    host: float = 0.0  # pinned CPU memory: the offloaded layer inputs (fast engine), not in the GPU's peak
    grad_accum: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def persistent(self) -> float:
        return self.weights + self.trainable + self.optimizer

    @property
    def peak_allocated(self) -> float:
        transient = self.activations + self.logits + self.gathered
        # with one micro-batch per step, gradients fill in as activations are freed: the backward holds
        # mostly one or the other; accumulation keeps the gradients through the next forward
        fb = transient + self.gradients if self.grad_accum > 1 else max(transient, self.gradients)
        step = self.gradients + self.optimizer_step_extra
        return self.persistent + max(fb, step)

    @property
    def peak(self) -> float:
        """Predicted peak reserved by PyTorch (what the allocator holds), without the CUDA context."""
        return self.peak_allocated + self.allocator

    def table(self) -> str:
        rows = [("weights (frozen base)", self.weights), ("trainable parameters", self.trainable),
                ("gradients", self.gradients), ("optimizer state (AdamW)", self.optimizer),
                ("activations", self.activations), ("logits + loss", self.logits),
                ("optimizer step temporaries", self.optimizer_step_extra), ("allocator slack", self.allocator)]
        if self.gathered:
            rows.insert(-1, ("FSDP2 gathered layers", self.gathered))
        lines = [f"  {name:<28} {v / GIB:8.2f} GiB" for name, v in rows]
        lines.append(f"  {'predicted peak (reserved)':<28} {self.peak / GIB:8.2f} GiB")
        lines.append(f"  {'+ CUDA context':<28} {self.cuda_context / GIB:8.2f} GiB")
        lines.append(f"  {'activations if checkpointing toggled':<28} {self.activations_other / GIB:.2f} GiB")
        lines += [f"  {'CPU memory: offloaded inputs':<28} {self.host / GIB:8.2f} GiB (pinned)"] if self.host else []
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _family(name: str) -> str:
    if name in ("lora", "dora", "rslora", "pissa"):
        return "lora"
    if name in ("prompt_tuning", "p_tuning", "prefix_tuning"):
        return "prompt"
    return {"qlora": "qlora", "ia3": "ia3", "full": "full", "freeze": "freeze", "bitfit": "prompt"}[name]


_META: dict[str, tuple[torch.nn.Module, PretrainedConfig]] = {}


def _meta_model(cfg: Config, mcfg: PretrainedConfig | None = None) -> tuple[torch.nn.Module, PretrainedConfig]:
    """The method applied to the model built on the meta device (cached: estimates come in grids). mcfg: the
    transformers config of a model built in code, instead of model.path's."""
    key = repr((cfg.model.path if mcfg is None else mcfg.to_json_string(), cfg.method))
    if key not in _META:
        _META[key] = _build_meta(cfg, mcfg)
    return _META[key]


def _build_meta(cfg: Config, mcfg: PretrainedConfig | None = None) -> tuple[torch.nn.Module, PretrainedConfig]:
    from transformers import AutoModelForCausalLM

    mcfg = mcfg if mcfg is not None else load_config(cfg.model.path, cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=cfg.model.trust_remote_code)
    return methods.apply(model, cfg.method), mcfg


def estimate(cfg: Config, rows: list[tuple[int, int]] | None = None, gpus: int = 1,
             mcfg: PretrainedConfig | None = None, kernels: select.Kernels | None = None,
             dtypes: precision.Dtypes | None = None) -> Estimate:
    """Predicted peak for a config, per GPU. rows: (length, trained tokens) of the largest micro-batch; by
    default micro_batch_size rows of data.max_len tokens, all trained (the worst case). gpus > 1: FSDP2
    over that many (engine/distributed.py): the micro-batch split by tokens, every persistent part
    sharded, whole layers gathered while they compute. An auto split counts as one micro-batch of
    train.batch_size (engine/split.py chooses the real one). mcfg: the config of a model built in code (default:
    model.path's). kernels, dtypes: the run plan's (engine/run_plan.py); default: a GPU run's (select.on_gpu)."""
    cfg = with_split(cfg)
    rows = pair_rows(cfg, rows)  # a preference record is two sequences
    if gpus > 1:
        return _sharded(cfg, rows, gpus, mcfg, kernels, dtypes)
    model, mcfg = _meta_model(cfg, mcfg)
    plan = dtypes or precision.gpu_dtypes(cfg.train)
    est = Estimate(grad_accum=cfg.train.grad_accum)
    trainable_n = _parameters(est, model, cfg, plan)
    h = mcfg.hidden_size
    inter = moe_memory.ffn_width(mcfg)  # a mixture of experts: the top-k experts' width
    if rows is None:
        rows = [(cfg.data.max_len, cfg.data.max_len)] * cfg.train.micro_batch_size
    # train.fused_lora runs LoRA on fused experts per expert (kernels/expert_lora.py); a plan's kernels say so
    experts = bool(kernels.fused_expert_layers) if kernels else select.use_fused_lora(cfg.train.fused_lora, "cuda")
    kernels = kernels or replace(select.on_gpu(cfg, h), tiled_mlp=int(select.tiled_mlp_from(cfg.train.tiled_mlp,
                                                                                        "cuda") is not None))
    if kernels.fast and select.fusable(cfg.method):  # fused LoRA: each adapter cast once a step (lora_math.cast_once)
        est = _fast(est, cfg, mcfg, h, inter, rows, kernels)
        est.activations += trainable_n * BYTES[plan.autocast] if plan.autocast not in (None, plan.trainable) else 0
        return moe_memory.expert_copies(est, model, cfg, plan, experts)
    layers = mcfg.num_hidden_layers
    vocab = mcfg.vocab_size
    width = max(length for length, _ in rows)
    tokens = width * len(rows)  # right padding: every row is as long as the longest
    trained = sum(t for _, t in rows)
    family = _family(cfg.method.name)
    act_dtype = 2 if plan.weights != torch.float32 else 4
    scale = act_dtype / 2
    per_layer = LAYER_COEF[family] * (h + inter) * scale
    if family == "prompt" and cfg.method.name != "prefix_tuning":
        tokens_in = tokens + len(rows) * cfg.method.num_virtual_tokens
    else:
        tokens_in = tokens
    # layers below a freeze run's trainable ones take no part in backward: they keep nothing
    deep = min(cfg.method.trainable_layers, layers) if family == "freeze" else layers
    full_acts = tokens_in * deep * per_layer
    resid = 4 if family == "full" and plan.trainable == torch.float32 else act_dtype
    ckpt_acts = tokens_in * deep * h * resid * CKPT_INPUT + tokens_in * per_layer
    use_ckpt = cfg.train.gradient_checkpointing and cfg.method.name != "prefix_tuning"
    est.activations, est.activations_other = (ckpt_acts, full_acts) if use_ckpt else (full_acts, ckpt_acts)
    # peft's prompt wrappers compute every position's logits (bf16, transient) before the loss picks the
    # trained ones; the fp32 copies and log-softmax cover the trained positions only
    est.logits = max(trained * vocab * LOGIT_BYTES, (tokens if family == "prompt" else 0) * vocab * 2) * scale
    if plan.autocast is not None and family in ("full", "freeze"):
        est.activations += trainable_n * BYTES[plan.autocast]  # autocast's half copies of fp32 weights
    est.allocator = min(ALLOC_SLACK_CAP, (ALLOC_SLACK_CKPT if use_ckpt else ALLOC_SLACK)
                        * (est.peak_allocated - est.persistent))
    if cfg.method.name == "prefix_tuning" and cfg.train.gradient_checkpointing:
        est.notes.append("prefix_tuning trains without checkpointing (the prefix travels as a KV cache)")
    return moe_memory.expert_copies(est, model, cfg, plan, experts)


def _parameters(est: Estimate, model: torch.nn.Module, cfg: Config, plan: precision.Dtypes) -> int:
    """Fill est's frozen weights, trainable parameters, gradients and AdamW state from the meta model;
    returns the count of trainable parameters."""
    wbytes, tbytes = BYTES[plan.weights], BYTES[plan.trainable]
    modules = dict(model.named_modules())
    head = model.get_output_embeddings()
    trainable_n = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable_n += p.numel()
            continue
        owner = modules.get(name.rsplit(".", 1)[0])
        if cfg.method.name == "qlora" and (isinstance(owner, torch.nn.Linear) and owner is not head
                                           or moe_memory.packed_stack(owner, p)):
            # NF4: half a byte per weight + an 8-bit absmax per 64 (double quantization) + fp32 per 256 of those
            per = moe_memory.NF4_BYTES if cfg.method.quant_bits == 4 else 1 + 4 / p.shape[-1]
            est.weights += p.numel() * per
        else:
            est.weights += p.numel() * wbytes
    est.trainable = est.gradients = trainable_n * tbytes
    est.optimizer = 2 * trainable_n * tbytes
    est.optimizer_step_extra = trainable_n * tbytes  # foreach AdamW: one parameter-sized temporary
    return trainable_n


def _sharded(cfg: Config, rows: list[tuple[int, int]] | None, gpus: int, mcfg: PretrainedConfig | None = None,
             kernels: select.Kernels | None = None, dtypes: precision.Dtypes | None = None) -> Estimate:
    """One rank of an FSDP2 run: its share of the micro-batch (split by tokens, as the loop does), 1/gpus
    of weights, trainable parameters, gradients and AdamW state, plus what is gathered whole while it
    computes: the root (embeddings, head: kept from forward to backward), the layers in flight and what
    train.fsdp_reshard keeps of the others (engine/fsdp_memory.py), and one layer's unsharded gradients
    before their reduce-scatter."""
    if rows is None:
        rows = [(cfg.data.max_len, cfg.data.max_len)] * cfg.train.micro_batch_size
    groups = distributed.split([n for n, _ in rows], gpus)
    mine = max(([rows[i] for i in g] for g in groups), key=lambda g: sum(n for n, _ in g))
    est = estimate(cfg, mine or rows[:1], mcfg=mcfg, kernels=kernels, dtypes=dtypes)
    for part in ("weights", "trainable", "gradients", "optimizer", "optimizer_step_extra"):
        setattr(est, part, getattr(est, part) / gpus)
    est.optimizer_step_extra *= FSDP_STEP_EXTRA
    plan = dtypes or precision.gpu_dtypes(cfg.train)
    u = fsdp_memory.units(_meta_model(cfg, mcfg)[0], BYTES[plan.weights], BYTES[plan.trainable])
    held = fsdp_memory.held(u, gpus, cfg.train.fsdp_reshard, cfg.train.fsdp_prefetch)
    # gathered weights land in buffers of their own beside the shards (the root's stay from forward to
    # backward). Reserved beyond allocated: the blocks FSDP2's all-gather and reduce-scatter streams
    # keep cached (two layers gathered, the unsharded gradients of a layer and of the root) plus the
    # sharded gradients' size; fitted on 8B LoRA and full fine-tuning on 2 and 4 H200s (bench/results) at
    # the default settings. 8B LoRA on 4 H200s with layers kept whole (fsdp_reshard=1) measured 20.09 GiB
    # allocated, 22.8 reserved; this predicts 20.33 and 22.51 with the same cache term. Groups of k and
    # prefetch are modelled, not measured (bench/check_fsdp_estimator.py compares each new row).
    est.gathered = u.root + held.layers + u.biggest_grad
    est.allocator = min(ALLOC_SLACK_CAP, ALLOC_SLACK * (est.peak_allocated - est.persistent)) \
        + fsdp_memory.DEFAULT_IN_FLIGHT * u.biggest + u.biggest_grad + u.root_grad + est.gradients
    est.notes.append(f"FSDP2 over {gpus} GPUs: {len(mine)} of the micro-batch's {len(rows)} records on the "
                     f"busiest GPU; weights, gradients and AdamW state sharded; {held.note}")
    return est


def fast_engine(cfg: Config, kernels: select.Kernels | None = None) -> bool:
    """Whether a run with these kernels (default: what `train` on a GPU chooses) runs this config on the fast
    engine the fast model describes: plain LoRA without dropout (fused layers), packed rows, the chunked loss."""
    return (kernels or select.on_gpu(cfg)).fast and select.fusable(cfg.method)


def _fast(est: Estimate, cfg: Config, mcfg: PretrainedConfig, h: int, inter: int, rows: list[tuple[int, int]],
          kernels: select.Kernels) -> Estimate:
    tc = cfg.train
    layers, vocab = mcfg.num_hidden_layers, mcfg.vocab_size
    tokens, trained = sum(n for n, _ in rows), sum(t for _, t in rows)
    if kernels.packing != "rows":  # bins: a micro-batch holds up to micro_batch_size x max_len tokens
        budget = tc.micro_batch_size * cfg.data.max_len
        trained, tokens = trained * budget / max(tokens, 1), budget
    liger = kernels.fused_norm_mlp
    coef = FAST_LAYER_COEF_LIGER if liger else FAST_LAYER_COEF
    per_layer = coef * (h + inter)
    chunk = min(trained, linear_ce.chunk_rows(vocab)) * vocab * FAST_LOGIT_BYTES
    past = select.tiled_mlp_from(tc.tiled_mlp, "cuda") if kernels.tiled_mlp else None
    # tiled MLP (kernels/tiled_mlp.py): the recomputed layer holds one slice's intermediates, not every token's
    # (the intermediate share of the fitted coefficient, scaled to a slice: modelled, not yet measured)
    mlp_tokens = tiled_mlp.tile_rows(h, int(tokens)) if past is not None and tokens > past else tokens
    inputs = tokens * layers * h * 2  # every layer's input, bf16: what checkpointing keeps (or offloads)

    def moments(ckpt: bool) -> tuple[float, float]:
        if ckpt:
            stored = 0.0 if tc.offload_activations else inputs
            backward = stored + tokens * (coef * h + FAST_BACKWARD * h) + mlp_tokens * coef * inter
        else:
            stored = tokens * layers * per_layer
            backward = stored + tokens * FAST_BACKWARD * h
        loss = stored + tokens * h * FAST_FINAL_HIDDEN + chunk
        return backward + FAST_CONST, max(0.0, loss - backward)

    est.activations, est.logits = moments(tc.gradient_checkpointing)
    est.host = inputs if tc.offload_activations and tc.gradient_checkpointing else 0.0
    est.activations_other = sum(moments(not tc.gradient_checkpointing))
    est.allocator = min(ALLOC_SLACK_CAP, ALLOC_SLACK * (est.peak_allocated - est.persistent))
    est.notes.append(f"fast engine: packed rows of {int(tokens)} tokens, loss in chunks of "
                     f"{linear_ce.chunk_rows(vocab)} rows" + (", Liger norm/MLP" if liger else "")
                     + (f", MLP in slices of {int(mlp_tokens)} tokens" if mlp_tokens < tokens else "")
                     + (", layer inputs offloaded to CPU" if tc.offload_activations and tc.gradient_checkpointing
                        else ""))
    if tc.offload_activations and not tc.gradient_checkpointing:
        est.notes.append("offload without checkpointing is not modelled (not measured): activations are counted "
                         "as if on the GPU, an upper bound")
    return est


def faster(cfg: Config, rows: list[tuple[int, int]] | None = None, kernels: select.Kernels | None = None,
           dtypes: precision.Dtypes | None = None) -> tuple[str, float] | None:
    """On the fast engine with gradient accumulation: the same records per step in one offloaded micro-batch
    (rows: the longest, repeated: a bound), and its predicted peak (with the CUDA context). The CPU paces a small
    model's step (kernel launches), so fewer, larger micro-batches are faster: bench/speed.py measured 1.5-2.0x
    the tokens/s of 8 x 2 on an H100 (README). None where it does not apply."""
    cfg = with_split(cfg)
    tc = cfg.train
    if not (fast_engine(cfg, kernels) and tc.grad_accum > 1 and tc.gradient_checkpointing):
        return None
    mb = tc.micro_batch_size * tc.grad_accum
    one = replace(cfg, train=replace(tc, micro_batch_size=mb, grad_accum=1, offload_activations=True))
    est = estimate(one, None if rows is None else list(rows) * tc.grad_accum, kernels=kernels, dtypes=dtypes)
    return (f"train.micro_batch_size={mb} train.grad_accum=1 train.offload_activations=true",
            est.peak + est.cuda_context)


def parse_size(text: str) -> float:
    """'24', '24GiB', '24GB', '24g', '1500MiB' -> bytes. A bare number is GiB (24 bytes is never meant), and
    GB is read as GiB, as GPU makers mean it."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([GMKT]?)(i?B)?\s*", text, re.IGNORECASE)
    size = 0.0
    if m:
        unit = m.group(2).upper() or ("" if m.group(3) else "G")  # "100B" is bytes, a bare "24" GiB
        size = float(m.group(1)) * {"T": 2 ** 40, "G": GIB, "M": 2 ** 20, "K": 2 ** 10, "": 1}[unit]
    if not 0 < size < float("inf"):
        raise ConfigError(f"--budget {text!r}: expected a positive size such as 24 (GiB), 24GiB or 1500MiB")
    return size


def verdict_line(est: Estimate, budget: float) -> str:
    """`budget 24.0 GiB: predicted 9.87 GiB with the CUDA context: fits` (the web app shows the same line)."""
    total = est.peak + est.cuda_context
    verdict = "fits" if total <= budget else "does NOT fit"
    return f"budget {budget / GIB:.1f} GiB: predicted {total / GIB:.2f} GiB with the CUDA context: {verdict}"


def suggestions(cfg: Config, budget: float, rows: list[tuple[int, int]] | None = None,
                kernels: select.Kernels | None = None) -> list[tuple[str, float]]:
    """Single changes to the config that bring the predicted peak (with the CUDA context) under budget
    (kernels: the run plan's; default what a GPU run takes)."""
    cfg = with_split(cfg)
    cands: list[tuple[str, object]] = []
    tc = cfg.train
    if not tc.gradient_checkpointing:
        on = replace(cfg, train=replace(tc, gradient_checkpointing=True))
        cands.append(("train.gradient_checkpointing=true", on))
    elif fast_engine(cfg, kernels) and not tc.offload_activations:
        cands.append(("train.offload_activations=true", replace(cfg, train=replace(tc, offload_activations=True))))
    mb = tc.micro_batch_size
    while mb > 1:
        mb //= 2
        accum = tc.grad_accum * tc.micro_batch_size // mb
        cands.append((f"train.micro_batch_size={mb} train.grad_accum={accum}",
                      replace(cfg, train=replace(tc, micro_batch_size=mb, grad_accum=accum))))
    for length in (2048, 1024, 512, 256):
        if length < cfg.data.max_len:
            cands.append((f"data.max_len={length}", replace(cfg, data=replace(cfg.data, max_len=length))))
    if cfg.method.name in ("lora", "dora", "rslora", "pissa"):
        cands.append(("method.name=qlora", replace(cfg, method=replace(cfg.method, name="qlora"))))
    if cfg.method.name in ("full",):
        cands.append(("method.name=lora", replace(cfg, method=replace(cfg.method, name="lora"))))
    if precision.gpu_dtypes(cfg.train).weights == torch.float32:
        cands.append(("train.precision=bf16", replace(cfg, train=replace(tc, precision="bf16"))))
    out = []
    for text, c in cands:
        est = estimate(c, None if rows is None else _trim(rows, c), kernels=kernels)
        out.append((text, est.peak + est.cuda_context))
    fits = [(t, p) for t, p in out if p <= budget]
    if fits:
        return fits
    combined, texts = cfg, []  # no single change: apply them one after another until it fits
    for text, c in cands:
        if "micro_batch_size" in text and any("micro_batch_size" in t for t in texts):
            texts = [t for t in texts if "micro_batch_size" not in t]
        if "max_len" in text and any("max_len" in t for t in texts):
            texts = [t for t in texts if "max_len" not in t]
        combined = _merge(combined, c, cfg)
        texts.append(text)
        est = estimate(combined, None if rows is None else _trim(rows, combined), kernels=kernels)
        if est.peak + est.cuda_context <= budget:
            return [(" ".join(texts), est.peak + est.cuda_context)]
    return []


def _merge(acc: Config, changed: Config, original: Config) -> Config:
    """acc with the fields where `changed` differs from `original` taken from `changed`."""
    def part(a: object, c: object, o: object) -> object:
        return replace(a, **{k: getattr(c, k) for k in vars(o) if getattr(c, k) != getattr(o, k)})
    return replace(acc, **{s: part(getattr(acc, s), getattr(changed, s), getattr(original, s))
                           for s in ("model", "data", "method", "train")})


def _trim(rows: list[tuple[int, int]], cfg: Config) -> list[tuple[int, int]]:
    """The worst micro-batch under a changed config: fewer rows, or rows cut at a shorter max_len."""
    cut = [(min(n, cfg.data.max_len), min(t, cfg.data.max_len)) for n, t in rows]
    return cut[: cfg.train.micro_batch_size]
