"""train.batch_size and its split into micro_batch_size x grad_accum, as far as the config alone decides it
(engine/split.py chooses the split of a config that leaves both parts auto)."""
from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from .convert import AUTO

if TYPE_CHECKING:
    from .fields import Config, TrainConfig

DEFAULT_MICRO, DEFAULT_ACCUM = 4, 1  # what an auto batch_size is counted from: 4 records a step, as before


def records_per_step(tc: TrainConfig) -> int:
    """train.batch_size, or for auto micro_batch_size x grad_accum, each auto counted as 4 and 1 (the defaults
    before batch_size existed), so an older config trains as many records a step as it did."""
    if tc.batch_size != AUTO:
        return tc.batch_size
    micro = DEFAULT_MICRO if tc.micro_batch_size == AUTO else tc.micro_batch_size
    return micro * (DEFAULT_ACCUM if tc.grad_accum == AUTO else tc.grad_accum)


def is_auto(tc: TrainConfig) -> bool:
    """Whether slimtune picks the split: micro_batch_size and grad_accum both auto (one set fixes the other)."""
    return tc.micro_batch_size == AUTO and tc.grad_accum == AUTO


def stated(tc: TrainConfig) -> tuple[int, int, int]:
    """(batch_size, micro_batch_size, grad_accum) as the config states them, an auto part derived from the
    others; both parts auto: one micro-batch of the batch (the first option engine/split.py tries)."""
    batch = records_per_step(tc)
    if is_auto(tc):
        return batch, batch, 1
    micro = tc.micro_batch_size if tc.micro_batch_size != AUTO else batch // tc.grad_accum
    return batch, micro, batch // micro


def with_split(cfg: Config) -> Config:
    """cfg with train.batch_size, micro_batch_size and grad_accum as numbers (stated)."""
    tc = cfg.train
    if AUTO not in (tc.batch_size, tc.micro_batch_size, tc.grad_accum):
        return cfg
    batch, micro, accum = stated(tc)
    return replace(cfg, train=replace(tc, batch_size=batch, micro_batch_size=micro, grad_accum=accum))


def adopt(saved: Config, cfg: Config) -> Config:
    """Resuming: the parts of the split this config leaves auto are the checkpoint's (its config.yaml holds
    them resolved) when it trains as many records a step, so the run goes on as it started whatever memory is
    free now; a change of batch size is left for the comparison to name."""
    tc, s = cfg.train, saved.train
    if records_per_step(s) != records_per_step(tc):
        return cfg
    keys = [k for k in ("batch_size", "micro_batch_size", "grad_accum") if getattr(tc, k) == AUTO]
    if is_auto(tc):  # the plan may have turned these on
        keys += ["gradient_checkpointing", "offload_activations"]
    return replace(cfg, train=replace(tc, **{k: getattr(s, k) for k in keys}))
