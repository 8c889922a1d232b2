"""`slimtune train` of a GRPO config with the sampler replaced, as a subprocess torchrun can start.
Usage: python grpo_train.py MODE CONFIG [train args...], MODE one of
- fixed: each prompt's G completions are drawn from its own tokens (not the model), so one process and several
  train on the very same completions;
- real: the real sampler;
- rank0-stops: the real sampler, but on rank 0 every token ends a completion, so rank 0's completions end at once
  while the other ranks' go on decoding (with the sharded layers gathered for every step of theirs).
With GRPO_DUMP=folder each rank saves the completion ids it sampled there, as rank<R>-<seed>.pt."""
from __future__ import annotations

import os
import sys
from typing import Any

import torch

from slimtune import cli
from slimtune.engine import distributed, grpo_sample, grpo_step

REAL = grpo_step.sample


def fixed(model: torch.nn.Module, records: list, g: Any, pad: int, stops: list[int], device: str, seed: int,
          context: Any = None, decoder: Any = None) -> dict[str, torch.Tensor]:
    rows = []
    for r in records:
        gen = torch.Generator().manual_seed(sum(r.prompt_ids) * 7919 + len(r.prompt_ids))
        for _ in range(g.num_generations):
            n = int(torch.randint(1, g.max_new_tokens, (1,), generator=gen))
            rows.append([i for i in torch.randint(3, 60, (n,), generator=gen).tolist() if i not in stops] + [stops[0]])
    prompt_ids, prompt_mask = grpo_sample.left_pad([r.prompt_ids for r in records for _ in range(g.num_generations)],
                                                   pad, device)
    width = max(len(x) for x in rows)
    completions = torch.tensor([x + [pad] * (width - len(x)) for x in rows], device=device)
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completions,
            "completion_mask": grpo_sample.completion_mask(completions, stops)}


def real(model: torch.nn.Module, records: list, g: Any, pad: int, stops: list[int], device: str, seed: int,
         context: Any = None, decoder: Any = None) -> dict[str, torch.Tensor]:
    b = REAL(model, records, g, pad, stops, device, seed, context, decoder)
    if os.environ.get("GRPO_DUMP"):
        torch.save(b["completion_ids"], os.path.join(os.environ["GRPO_DUMP"], f"rank{distributed.rank()}-{seed}.pt"))
    return b


def rank0_stops(model: torch.nn.Module, records: list, g: Any, pad: int, stops: list[int], device: str, seed: int,
                context: Any = None, decoder: Any = None) -> dict[str, torch.Tensor]:
    if distributed.rank() == 0:
        stops = list(range(model.get_input_embeddings().num_embeddings))
    return real(model, records, g, pad, stops, device, seed, context, decoder)


if __name__ == "__main__":
    grpo_step.sample = {"fixed": fixed, "real": real, "rank0-stops": rank0_stops}[sys.argv[1]]
    sys.exit(cli.main(["train", *sys.argv[2:]]))
