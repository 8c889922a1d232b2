"""Batches: right padding for training, left padding for generation, and the pad id's fallback to EOS."""
from __future__ import annotations

import torch

from conftest import make_tokenizer
from slimtune.data.collate import collate, left_pad, pad_id
from slimtune.data.encode import IGNORE, Encoded


def test_collate_right_pads_to_the_longest():
    records = [Encoded([5, 6, 7], [IGNORE, 6, 7]), Encoded([8], [8]),
               Encoded([9, 10, 11, 12], [IGNORE, IGNORE, 11, 12])]
    batch = collate(records, pad=2)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7, 2], [8, 2, 2, 2], [9, 10, 11, 12]]))
    assert torch.equal(batch["labels"],
                       torch.tensor([[-100, 6, 7, -100], [8, -100, -100, -100], [-100, -100, 11, 12]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_collate_equal_lengths_adds_no_padding():
    batch = collate([Encoded([1, 2], [IGNORE, 2]), Encoded([3, 4], [3, 4])], pad=0)
    assert batch["input_ids"].tolist() == [[1, 2], [3, 4]]
    assert batch["labels"].tolist() == [[IGNORE, 2], [3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 1]]


def test_left_pad():
    batch = left_pad([[1, 2, 3], [4], [5, 6]], pad=9)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [9, 9, 4], [9, 5, 6]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1], [0, 1, 1]]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_id_is_the_pad_token(tokenizer):
    # the fixture's pad is its EOS, <|im_end|>
    assert pad_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
    own = make_tokenizer(pad="<|endoftext|>")
    assert pad_id(own) == own.convert_tokens_to_ids("<|endoftext|>") != own.eos_token_id


def test_pad_id_falls_back_to_eos():
    tok = make_tokenizer(eos="</s>", pad=None)
    assert tok.pad_token_id is None
    assert pad_id(tok) == tok.convert_tokens_to_ids("</s>")
    assert isinstance(pad_id(tok), int)
