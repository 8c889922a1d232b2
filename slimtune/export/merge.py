"""Merge a run into a plain transformers model folder: base + adapter (or our trained parts)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..methods.base import MethodError, is_peft
from ..models import DTYPES
from .peft_format import load_run

PROBE = ["Who are you?", "The capital of France is", "Give three tips for staying healthy."]


def merge(folder: str | Path, output: str | Path, dtype: str = "fp32", log=print) -> float:
    """Write the merged model and tokenizer; returns the max |logit difference| merged vs unmerged."""
    model, tokenizer, cfg = load_run(folder, quantized=False)
    ids = torch.tensor([tokenizer(" ".join(PROBE))["input_ids"]])
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    if is_peft(model):
        if model.active_peft_config.is_prompt_learning:
            raise MethodError(f"method {cfg.method.name} adds virtual tokens at run time; there are no weights "
                              "to merge into the base: load the adapter with peft instead")
        model = model.merge_and_unload()
    with torch.no_grad():
        diff = float((model(input_ids=ids).logits.float() - before).abs().max())
    model = model.to(DTYPES[dtype])
    out = Path(output)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    log(f"merged {folder} ({cfg.method.name}) into {out} as {dtype}; merged vs unmerged max |logit diff| "
        f"= {diff:.2e} (fp32)")
    return diff
