"""Generation with the training template: batched (left padding, length-sorted), greedy by default."""
from __future__ import annotations

import torch

from ..data.collate import left_pad, pad_id
from ..data.encode import prompt_ids
from ..data.templates import render, stop_tokens


def stop_ids(template: str, tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens(template, tokenizer)]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


@torch.no_grad()
def generate(model, tokenizer, template: str, conversations: list[list[dict]], max_new_tokens: int = 128,
             batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             device: str = "cpu") -> list[str]:
    """Answers for conversations that end with a user turn, in input order."""
    prompts = [prompt_ids(render(template, c, tokenizer, add_generation_prompt=True), tokenizer)
               for c in conversations]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    out: list[str] = [""] * len(prompts)
    pad, stops = pad_id(tokenizer), stop_ids(template, tokenizer)
    model.eval()
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in left_pad([prompts[i] for i in idx], pad).items()}
        kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                             **kwargs)
        for row, i in zip(gen[:, batch["input_ids"].shape[1]:].tolist(), idx):
            cut = next((k for k, t in enumerate(row) if t in stops), len(row))
            out[i] = tokenizer.decode(row[:cut], skip_special_tokens=True).strip()
    return out
