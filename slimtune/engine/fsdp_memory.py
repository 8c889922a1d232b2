"""What FSDP2 holds unsharded on one GPU at its peak, beside the shards: the estimator's FSDP2 terms.

engine/distributed.shard() makes each decoder layer a unit and the rest (embeddings, head) the root. A unit's
weights are all-gathered into a buffer of their own while it computes; the shard stays where it was
(torch's FSDPParam keeps `sharded_param` and gathers into `all_gather_outputs`). Two settings decide how much
is unsharded at once:
- train.fsdp_reshard: after its forward a layer is spread over all GPUs again (0, the default), kept whole
  until its backward (1: FSDP2's reshard_after_forward=False, so at the end of forward every layer's full
  weights are held), or spread over a group of k GPUs (k: FSDPParam.to_sharded_post_forward keeps a clone of
  1/k of the layer until its backward all-gathers it back);
- train.fsdp_prefetch: N layers all-gathered ahead explicitly, so N + 1 are unsharded at once (the one
  computing and N ahead) instead of FSDP2's own two.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from . import distributed

DEFAULT_IN_FLIGHT = 2  # FSDP2's own prefetch: the layer computing and the next one, fitted (engine/memory.py)


@dataclass(frozen=True)
class Units:
    """Bytes of each FSDP2 unit's parameters whole (frozen + trainable) and of their gradients."""

    layers: list[float]  # each decoder layer's weights, frozen and trainable, unsharded
    layer_grads: list[float]  # each decoder layer's trainable parameters (their unsharded gradients)
    root: float  # embeddings, head, prompt encoders: gathered from forward to backward
    root_grad: float

    @property
    def biggest(self) -> float:
        return max(self.layers, default=0.0)

    @property
    def biggest_grad(self) -> float:
        return max(self.layer_grads, default=0.0)


@dataclass(frozen=True)
class Held:
    """Layer weights unsharded at the peak on one GPU, and how the settings were read."""

    layers: float  # the layers in flight, whole, plus what the reshard setting keeps of the others
    in_flight: int  # layers all-gathered at once (computing + prefetched)
    kept_over: int  # GPUs a layer is spread over between forward and backward (world: the default)
    note: str  # which settings the figure assumes, for the estimate's text


def units(model: torch.nn.Module, weight_bytes: int, trainable_bytes: int) -> Units:
    """The sizes of the units distributed.shard() makes of `model` (a meta model will do)."""

    def size(ps: Iterable[torch.nn.Parameter]) -> tuple[float, float]:
        ps = list(ps)
        frozen = sum(p.numel() * weight_bytes for p in ps if not p.requires_grad)
        train = sum(p.numel() * trainable_bytes for p in ps if p.requires_grad)
        return frozen + train, train

    sized = [size(layer.parameters()) for layer in distributed.layers(model)]
    inside = {id(p) for layer in distributed.layers(model) for p in layer.parameters()}
    root, root_grad = size(p for p in model.parameters() if id(p) not in inside)
    return Units([w for w, _ in sized], [g for _, g in sized], root, root_grad)


def held(u: Units, world: int, reshard: int = 0, prefetch: int = 0) -> Held:
    """Layer weights unsharded at once on one GPU of `world`, with train.fsdp_reshard and train.fsdp_prefetch.

    The kept part and the in-flight part add up: a layer in flight is whole (its post-forward part is freed
    when it is gathered back), every other layer holds 1/k of itself (k = 1: all of it) from its forward to
    its backward. Reshard=1 thus holds every layer whole at the end of forward, whatever the prefetch."""
    after = distributed.reshard_after_forward(reshard, world)  # True: all GPUs, False: whole, k: groups of k
    over = world if after is True else 1 if after is False else after
    ahead = max(DEFAULT_IN_FLIGHT, prefetch + 1)
    in_flight = min(ahead, max(DEFAULT_IN_FLIGHT, len(u.layers)))  # no more than the model's layers
    gathering = in_flight * u.biggest
    kept = 0.0 if over == world else max(0.0, sum(u.layers) - gathering) / over
    spread = {world: f"layers resharded over all {world} GPUs after their forward",
              1: "layers kept whole from forward to backward"}.get(over, f"layers kept on groups of {over} GPUs "
                                                                         "from forward to backward")
    own = ": FSDP2's own" if prefetch == 0 else ""
    note = (f"{spread} (train.fsdp_reshard={reshard}), {in_flight} layers gathered at once "
            f"(train.fsdp_prefetch={prefetch}{own})")
    return Held(gathering + kept, in_flight, over, note)
