"""A model that answers every prompt with the same token ids (tests of what generate, chat and the web page
show of an answer: tests/evaluate/test_decode.py, tests/test_chat.py)."""
from __future__ import annotations

from types import SimpleNamespace

import torch

ZH = "中文字符"  # the fixture tokenizer: 3 tokens, "中" + 2 bytes of 文 | 1 byte of 文 + 2 of 字 | 1 of 字 + 符


class Scripted(torch.nn.Module):
    """A model that answers every prompt with the same token ids, fed to the streamer as transformers' generate
    feeds it (the prompt, then one token per step, then end()); `interrupt_after`: Ctrl-C after that many."""

    def __init__(self, answer: list[int], interrupt_after: int | None = None):
        super().__init__()
        self.answer, self.interrupt_after = answer, interrupt_after
        self.config = SimpleNamespace(max_position_embeddings=512)

    def generate(self, input_ids, attention_mask, max_new_tokens, streamer=None, **kwargs):
        new = self.answer[:max_new_tokens]
        if streamer is not None:
            streamer.put(input_ids.cpu())
            for k, t in enumerate(new):
                if k == self.interrupt_after:
                    self.interrupt_after = None  # once
                    raise KeyboardInterrupt
                streamer.put(torch.tensor([t]))
            streamer.end()
        return torch.cat([input_ids, torch.tensor([new] * input_ids.shape[0])], dim=1)


def reader(lines: list):
    """chat_loop's `read` over scripted input: each call returns the next line; a line that is an exception class
    (KeyboardInterrupt, EOFError) is raised at the prompt instead."""
    feed = iter(lines)

    def read(prompt):
        item = next(feed)
        if isinstance(item, type):
            raise item()
        return item
    return read
