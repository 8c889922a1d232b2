"""Packed preference micro-batches (the run's packing on: each micro-batch's chosen and rejected sequences back to
back in one row, varlen attention) give the padded rows' log-probabilities and the same training."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from pairs_fixture import random_pairs
from slimtune.data import pack
from slimtune.data.collate import TRAINED
from slimtune.engine.pair_logps import SEQUENCE, collate_pairs, sequence_logps
from slimtune.engine.preference_step import items
from slimtune.kernels import attention, select
from test_pair_training import _cfg, dpo_run


def test_packed_row_holds_every_sequence_and_maps_its_trained_positions():
    recs = items(random_pairs(3, seed=5), "dpo")
    batch = collate_pairs(recs, 0, "cpu", packed=True)
    seqs = [r.pair.chosen_sequence() for r in recs] + [r.pair.rejected_sequence() for r in recs]
    assert batch["input_ids"].shape == (1, sum(len(s.input_ids) for s in seqs))
    assert batch[pack.BOUNDS][-1] == batch["input_ids"].shape[1]
    # each sequence's trained positions, counted by hand: its labels after the first that are not -100
    want = [sum(label != -100 for label in s.labels[1:]) for s in seqs]
    assert torch.bincount(batch[SEQUENCE], minlength=6).tolist() == want
    assert batch[SEQUENCE].shape == batch[TRAINED][1].shape
    assert batch["input_ids"].numel() < collate_pairs(recs, 0, "cpu")["input_ids"].numel()  # no padding computed


@pytest.mark.parametrize("chunked", [True, False])
def test_packed_logps_equal_padded(chunked):
    torch.manual_seed(0)
    model = make_model(400, seed=3).float().eval()
    attention.enable(model)
    recs = items(random_pairs(5, seed=9), "dpo")
    with torch.no_grad():
        padded, n_pad = sequence_logps(model, collate_pairs(recs, 0, "cpu"), chunked)
        packed, n_pack = sequence_logps(model, collate_pairs(recs, 0, "cpu", packed=True), chunked)
    assert n_pack.tolist() == n_pad.tolist() and padded.shape == (10,)
    assert torch.allclose(packed, padded, atol=1e-5, rtol=0), (packed - padded).abs().max()


def test_preference_objectives_and_grpo_pack_in_rows():
    for objective, want in (("dpo", "rows"), ("kto", "rows"), ("sft", "bins"), ("grpo", "rows")):
        cfg = _cfg("/tmp/unused", **{"train.objective": objective, "train.packing": "on"})
        assert select.choose(cfg.train, "cpu").packing == want, objective
    cfg = _cfg("/tmp/unused", **{"train.objective": "dpo", "train.packing": "auto"})
    assert select.choose(cfg.train, "cuda").packing == "rows" and select.choose(cfg.train, "cpu").packing == "off"


def test_dpo_trains_the_same_packed_as_padded(tmp_path):
    result, padded = dpo_run(tmp_path / "padded", steps=4)
    result_packed, packed = dpo_run(tmp_path / "packed", steps=4, **{"train.packing": "rows"})
    assert result_packed["packing"] == "rows" and result["packing"] == "off"
    for a, b in zip(padded, packed):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-5
    assert len(packed) == len(padded) == 4




@pytest.mark.skipif(not torch.cuda.is_available(), reason="varlen flash attention runs on CUDA only; the CPU "
                    "tests above check the packed row through the per-record attention")
def test_packed_logps_equal_padded_on_cuda_varlen():
    torch.manual_seed(0)
    model = make_model(400, seed=3).to("cuda", torch.bfloat16).eval()
    attention.enable(model)
    recs = items(random_pairs(6, seed=9), "dpo")
    with torch.no_grad():
        padded, _ = sequence_logps(model, collate_pairs(recs, 0, "cuda"))
        packed, _ = sequence_logps(model, collate_pairs(recs, 0, "cuda", packed=True))
    assert torch.allclose(packed, padded, atol=0.05 * padded.abs().max().item() + 0.05), (packed - padded).abs().max()
