"""Preference records of random tokens and the tiny model they run on, shared by the objectives tests."""
from __future__ import annotations

import random
from types import SimpleNamespace

from slimtune.data.pairs import EncodedPair

VOCAB = 400  # tests/conftest.make_tokenizer's size


def random_pairs(n: int, seed: int = 0, vocab: int = VOCAB, label: bool = False) -> list[EncodedPair]:
    """n records: prompts of 3-9 tokens, answers of 1-7 (odd, unequal lengths: padding in every batch)."""
    rng = random.Random(seed)
    toks = lambda k: [rng.randrange(5, vocab) for _ in range(k)]  # noqa: E731
    return [EncodedPair(toks(rng.randint(3, 9)), toks(rng.randint(1, 7)), [] if label else toks(rng.randint(1, 7)),
                        where=f"pairs line {i + 1}", label=(i % 3 != 0) if label else None) for i in range(n)]


def pref(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"beta": 0.1, "label_smoothing": 0.0, "simpo_gamma": 0.5, "orpo_lambda": 0.1,
                              "kto_desirable_weight": 1.0, "kto_undesirable_weight": 1.0, **kw})
