"""DCP checkpoints of full fine-tuning (runs/sharded.py) in one process: weights and AdamW state come back
exactly, and a folder that is not as slimtune wrote it is refused before anything is read. The 2-process
save, resume on 1 process and merge are in test_distributed.py."""
from __future__ import annotations

import json

import pytest
import torch

from slimtune.engine import guards
from slimtune.runs import sharded
from slimtune.errors import MismatchError
from slimtune.runs import adapter, checks


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Linear(5, 3))
    model[1].bias.requires_grad_(False)  # a frozen parameter is neither saved nor expected
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(torch.randn(4, 7)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_weights_and_adamw_state(tmp_path):
    model, opt = _trained(0)
    record = sharded.save(tmp_path, model, opt)
    assert record["index"]["params"] == ["0.bias", "0.weight", "1.weight"]
    assert not any(p.suffix in (".metadata", ".distcp") for p in (tmp_path / "sharded").iterdir())  # no pickle
    fresh, fresh_opt = _trained(1)
    with pytest.raises(sharded.UntrustedCheckpointError, match="does not record these shards"):
        sharded.load(tmp_path, fresh, fresh_opt, None)  # a trainer state without the record: not ours
    sharded.load(tmp_path, fresh, fresh_opt, record)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        if a.requires_grad:
            assert torch.equal(a, b), name
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        assert set(a) == set(b) == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert fresh_opt.param_groups[0]["lr"] == 1e-2
    top = max(float(p.detach().abs().max()) for p in model.parameters() if p.requires_grad)
    assert guards.checkpoint_max(tmp_path) == top  # the weights only, not AdamW's state beside them
    whole = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    sharded.load_weights(tmp_path, whole)  # what merge does
    checks.check_run(tmp_path)  # merge/chat/eval take the step folder as a finished run's: no error
    assert torch.equal(whole["0.weight"], model[0].weight) and not whole["1.bias"].any()
    base, _ = _trained(2)  # what load_run puts the run on: no parts file here, so the shards are consolidated
    assert adapter.parts_saved(tmp_path)
    assert adapter.load_parts(base, tmp_path) is base
    assert torch.equal(base[1].weight, model[1].weight) and not torch.equal(base[1].bias, model[1].bias)


def test_other_model_refused(tmp_path):
    model, opt = _trained(0)
    sharded.save(tmp_path, model, opt)
    with pytest.raises(MismatchError, match=r"0.weight is shape \(5, 7\) there, \(6, 7\) in this model"):
        sharded.load_weights(tmp_path, {"0.weight": torch.zeros(6, 7), "0.bias": torch.zeros(5),
                                        "1.weight": torch.zeros(3, 5)})


@pytest.mark.parametrize("tamper", ["extra_file", "writer", "missing"])
def test_folder_not_as_written_is_refused(tmp_path, tamper):
    model, opt = _trained(0)
    sharded.save(tmp_path, model, opt)
    folder = tmp_path / "sharded"
    if tamper == "extra_file":  # DCP's default format: a pickle slimtune never reads
        (folder / ".metadata").write_bytes(b"\x80\x04K\x01.")
    elif tamper == "writer":
        index = json.loads((folder / "index.json").read_text())
        (folder / "index.json").write_text(json.dumps(dict(index, writer="someone")))
    else:
        next(folder.glob("*.safetensors")).unlink()
    with pytest.raises(sharded.UntrustedCheckpointError, match="not a sharded checkpoint as slimtune writes it"):
        sharded.load_weights(tmp_path, dict(model.named_parameters()))
