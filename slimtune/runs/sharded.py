"""Full fine-tuning checkpoints under FSDP2, through torch.distributed.checkpoint (DCP): every rank writes
its own shard of the trained weights and AdamW state at once, nothing is gathered onto rank 0, and DCP
reshards on load, so the checkpoint resumes on any number of processes (one included).

    step-000120/sharded/
        shard-00001-model-00001-of-00001.safetensors   rank 0's shard: model.<param> and optim.state.<param>.*
        shard-00002-model-00001-of-00001.safetensors   rank 1's, ...
        index.json                                      slimtune's record: files, parameters, world size

Storage is DCP's safetensors format (HuggingFaceStorageWriter/Reader), not its default: the default
reader unpickles `.metadata` with plain `pickle.load` and loads non-tensor items with
`torch.load(weights_only=False)` (torch 2.13, checkpoint/filesystem.py and default_planner.py), so a
run folder from elsewhere could run code. Here every item is a tensor, read from safetensors headers
and slices; only the files index.json lists are read, and a folder holding any other file is refused.
"""
from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import DamagedFileError, MismatchError, SlimtuneError
from . import ranks

if TYPE_CHECKING:
    from torch.distributed.checkpoint import HuggingFaceStorageReader

DIR, INDEX = "sharded", "index.json"
FORMAT = "torch.distributed.checkpoint, safetensors storage"


class UntrustedCheckpointError(SlimtuneError, ValueError):
    """A sharded checkpoint folder that is not as slimtune wrote it; it is not read."""


def _optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """AdamW's state keyed by parameter name, sharded like the parameters (collective under FSDP2)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process call that it assumes one process: that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is .*assuming the intent")
        yield


def _trained(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank writes its shard under folder/sharded (all ranks call it, the folder seen by all); returns
    what the trainer state records: the optimizer's param_groups (plain numbers) and the index."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    target = Path(folder) / DIR
    optim = _optimizer_state(model, optimizer)
    writer = HuggingFaceStorageWriter(str(target), save_distributed=True)
    with _quiet():
        dcp.save({"model": _trained(model), "optim": {"state": optim["state"]}}, storage_writer=writer,
                 no_dist=not ranks.active())
    ranks.barrier()
    index = {"writer": "slimtune", "format": FORMAT, "world_size": ranks.size(),
             "params": sorted(_trained(model)), "files": sorted(p.name for p in target.glob("*.safetensors"))}
    if ranks.is_main():
        (target / INDEX).write_text(json.dumps(index, indent=1) + "\n")
    return {"param_groups": optim["param_groups"], "index": index}


def present(folder: Path) -> bool:
    return (Path(folder) / DIR / INDEX).is_file()


def _reader(folder: Path) -> HuggingFaceStorageReader:
    """DCP's safetensors reader over a folder checked against its index.json."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    target = Path(folder) / DIR
    try:
        index = json.loads((target / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DamagedFileError(f"{target / INDEX}: unreadable ({err}); this checkpoint cannot be loaded: resume from "
                               "an earlier one, or train again") from None
    listed = set(index.get("files", [])) if isinstance(index, dict) else set()
    found = {p.name for p in target.iterdir()} - {INDEX}
    if index.get("writer") != "slimtune" or index.get("format") != FORMAT or not listed or found != listed:
        odd = sorted(found ^ listed)
        raise UntrustedCheckpointError(
            f"{target}: not a sharded checkpoint as slimtune writes it ({INDEX} lists {sorted(listed)[:3]}, the folder "
            f"holds {sorted(found)[:3]}; differing: {odd[:3]}); only the safetensors files slimtune recorded are "
            "read. Delete this checkpoint folder and resume from an earlier one")
    return HuggingFaceStorageReader(str(target)), index


def _check_shapes(reader: HuggingFaceStorageReader, wanted: dict[str, torch.Tensor], where: Path) -> None:
    meta = reader.read_metadata().state_dict_metadata
    for name, t in wanted.items():
        saved = meta.get(f"model.{name}")
        if saved is None or tuple(saved.size) != tuple(t.shape):
            got = "missing" if saved is None else f"shape {tuple(saved.size)}"
            raise MismatchError(f"{where}: {name} is {got} there, {tuple(t.shape)} in this model; it was written by "
                                "another model or method")


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         record: dict[str, Any] | None) -> None:
    """Load weights and AdamW state (optimizer None: weights only) into this run's sharded or whole
    parameters: DCP reads each rank's part from whichever shards hold it. All ranks call it. record: what
    save() returned, from the checkpoint's trainer state; the shards must be the ones it lists."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if not isinstance(record, dict) or record.get("index", {}).get("files") != _reader(folder)[1]["files"]:
        raise UntrustedCheckpointError(f"{Path(folder) / DIR}: its trainer state ({Path(folder) / 'trainer_state.pt'})"
                                       " does not record these shards; delete this checkpoint folder and resume from "
                                       "an earlier one")
    reader, index = _reader(folder)
    trained = _trained(model)
    if sorted(trained) != index["params"]:
        odd = sorted(set(trained) ^ set(index["params"]))
        raise MismatchError(f"{folder}: its trained parameters differ from this model's ({', '.join(odd[:4])}); "
                            "it was written by another model or method")
    _check_shapes(reader, {n: p for n, p in trained.items()}, Path(folder) / DIR)
    state = {"model": trained}
    if optimizer is not None:  # its state made (zero) where none is yet: DCP fills it
        state["optim"] = {"state": _optimizer_state(model, optimizer)["state"]}
    with torch.no_grad(), _quiet():
        dcp.load(state, storage_reader=reader, no_dist=not ranks.active())
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, {"state": state["optim"]["state"],
                                                    "param_groups": record["param_groups"]})


def load_weights(folder: Path, params: dict[str, torch.Tensor]) -> None:
    """Copy a sharded checkpoint's trained weights into `params` (whole tensors, one process): what
    `slimtune merge` and `chat` read from a checkpoint folder of a full fine-tuning run on several GPUs."""
    import torch.distributed.checkpoint as dcp

    reader, index = _reader(folder)
    unknown = sorted(set(index["params"]) - set(params))
    if unknown:
        raise MismatchError(f"{folder}: parameters not in the base model: {', '.join(unknown[:5])}; was it trained "
                            "on another model?")
    wanted = {n: params[n] for n in index["params"]}
    _check_shapes(reader, wanted, Path(folder) / DIR)
    with torch.no_grad(), _quiet():
        dcp.load({"model": wanted}, storage_reader=reader, no_dist=True)


def weight_files(folder: Path) -> list[Path]:
    """The shard files of a sharded checkpoint (each holds model.<param> slices among optimizer state)."""
    return [Path(folder) / DIR / name for name in _reader(folder)[1]["files"]]
