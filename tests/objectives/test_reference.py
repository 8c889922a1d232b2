"""The reference without a second copy: the adapter switched off is the base model exactly; the precomputed
log-probabilities equal a live frozen copy's; and the combinations that make no sense are refused in one line."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import make_model
from pairs_fixture import pref, random_pairs
from slimtune import config as config_mod
from slimtune import methods
from slimtune.config import ConfigError
from slimtune.engine import reference
from slimtune.engine.pair_logps import Item, collate_pairs, sequence_logps
from slimtune.engine.preference_step import PairObjective, items


def _cfg(**over):
    return config_mod.load(None, [f"{k}={v}" for k, v in over.items()])


def _lora(model):
    peft = methods.apply(model, _cfg(**{"method.name": "lora", "method.r": 4, "method.dropout": 0.0}).method)
    with torch.no_grad():  # a trained adapter: B is not zero, so adapter on and off differ
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return peft


def test_adapter_off_reference_is_the_base_model_exactly():
    base = make_model(400, seed=4).float()
    frozen = copy.deepcopy(base)
    model = _lora(base)
    batch = collate_pairs([Item(p, i) for i, p in enumerate(random_pairs(6, seed=2))], 0, "cpu")
    chosen, rejected = reference.AdapterOff()(model, [], batch)
    with torch.no_grad():
        want, _ = sequence_logps(frozen.eval(), batch)
        live, _ = sequence_logps(model, batch)
    assert torch.equal(torch.cat([chosen, rejected]), want)
    assert (live - want).abs().max() > 1e-2  # the adapter does change them while on
    assert model.training  # the pass put train mode back


def test_precomputed_reference_equals_a_live_frozen_copy(tmp_path):
    model = make_model(400, seed=5).float()
    train = items(random_pairs(11, seed=3), "dpo")
    held = items(random_pairs(3, seed=4), "dpo", "eval")
    objective = PairObjective("dpo", pref(), "precomputed", pad=0)
    objective.start(model, {"train": train, "eval": held}, tmp_path, "cpu", 4, log=lambda *_: None)
    live = reference.Copy(model)
    same = collate_pairs(train[:4], 0, "cpu")  # the batch the pass computed: the very same numbers
    assert all(torch.equal(a, b) for a, b in zip(objective.ref(model, train[:4], same), live(model, train[:4], same)))
    for group in ([train[1], train[7], train[10]], train[:5], [held[2], held[0]]):  # batches of other widths
        batch = collate_pairs(group, 0, "cpu")
        got, want = objective.ref(model, group, batch), live(model, group, batch)
        for a, b in zip(got, want):
            # fp32 sums near -40 in matmuls of another padded width: an ulp (3.8e-6 at 41) apart at most
            assert ((a - b).abs() / b.abs().clamp(min=1)).max() <= 1e-6
    assert (tmp_path / reference.REFERENCE_FILE).is_file()
    # a resume reads the file back (no pass over the records) when it was made for the same records
    logs = []
    again = PairObjective("dpo", pref(), "precomputed", pad=0)
    again.start(model, {"train": train, "eval": held}, tmp_path, "cpu", 4, log=logs.append)
    assert logs == [f"reference log-probabilities read from {tmp_path / reference.REFERENCE_FILE}"]
    assert torch.equal(again.ref.tensors["train.chosen"], objective.ref.tensors["train.chosen"])
    other = PairObjective("dpo", pref(), "precomputed", pad=0)
    other.start(model, {"train": train[:-1], "eval": held}, tmp_path, "cpu", 4, log=logs.append)
    assert logs[-1].startswith("computing the reference")  # other records: computed again


@pytest.mark.parametrize("over,message", [
    ({"train.objective": "dpo", "train.reference": "adapter_off", "method.name": "full"},
     "train.reference=adapter_off with method.name=full: full trains the model's own weights, there is no adapter "
     "to switch off; use train.reference=precomputed or copy"),
    ({"train.objective": "dpo", "train.reference": "adapter_off", "method.name": "pissa"},
     "train.reference=adapter_off with method.name=pissa: PiSSA moves each weight's principal part into the "
     "adapter, so with it off the model is not the base; use train.reference=precomputed or copy"),
    ({"train.objective": "simpo", "train.reference": "copy"},
     "train.reference=copy: train.objective=simpo has no reference model; leave train.reference=auto"),
    ({"train.objective": "dpo", "method.name": "prompt_tuning"},
     "train.objective=dpo with method.name=prompt_tuning: the preference step reads the decoder's hidden states, "
     "which the virtual tokens of prompt methods bypass; use lora"),
])
def test_refused_combinations_are_one_line(over, message):
    with pytest.raises(ConfigError) as err:
        reference.resolve(_cfg(**over))
    assert str(err.value) == message


@pytest.mark.parametrize("objective,method,want", [("dpo", "lora", "adapter_off"), ("kto", "qlora", "adapter_off"),
                                                   ("dpo", "full", "precomputed"), ("ipo", "freeze", "precomputed"),
                                                   ("dpo", "pissa", "precomputed"), ("orpo", "full", "none"),
                                                   ("sft", "full", "none")])
def test_auto_picks(objective, method, want):
    assert reference.resolve(_cfg(**{"train.objective": objective, "method.name": method})) == want
