"""Checkpoints that survive kills: step folders written atomically, the newest K kept, the newest complete
one found for --resume, and SIGINT/SIGTERM/SIGHUP turned into a save at the next step boundary.

    <output_dir>/checkpoints/step-000120/
        adapter_config.json + adapter_model.safetensors (or slimtune_parts.safetensors), config.yaml:
            the method's own save, so `slimtune chat/merge/generate` take this folder as they take a run's
        trainable.safetensors   peft methods: the raw trainable parameters, what a resume loads
        trainer_state.pt        optimizer, scheduler, GradScaler, RNG states (every rank's), data position, progress
        sharded/                instead of the weights and the optimizer: full fine-tuning on several
                                processes, each rank's shard written through DCP (runs/sharded.py)
        COMPLETE                written last, before the folder gets its name

A folder is written as .tmp-step-000120-<pid> (-dcp when sharded: one name on every rank), every file
fsynced, then renamed: a kill leaves either a complete step folder or a .tmp one, which is never picked
and is removed by the next run. Pruning renames a step folder to .old-step-000120-<pid> before deleting
it, for the same reason.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import config as config_mod
from .. import methods
from ..config.batch import adopt
from ..methods.base import is_peft, trainable_state
from ..methods.parts import PARTS
from ..errors import MismatchError
from ..models import UnsafeFileError, pickle_refused
from . import ranks, sharded
from .ranks import local_part
from .signals import SignalScope

ROOT, STATE, DONE, RAW = "checkpoints", "trainer_state.pt", "COMPLETE", "trainable.safetensors"
STEP = re.compile(r"step-(\d+)")
# keys a resumed run may change: they alter what is logged or saved, never the numbers trained
FREE_KEYS = {"train.resume", "train.save_every", "train.keep_checkpoints", "train.on_nan", "train.log_every",
             "train.eval_at_start", "train.eval_every", "train.eval_generate", "train.eval_max_records",
             "train.eval_max_new_tokens", "train.eval_separator", "train.loss", "train.eval_max_tokens",
             "train.fused_lora", "train.fused_norm_mlp", "train.fused_rope",
             "train.tiled_mlp", "train.compile", "train.profile_step"}
# and train.lr, which does change them: so a run that diverged can go on from its last sane checkpoint more
# gently (guards.resume_advice says so; loop._new_peak_lr moves the schedule to the new peak)
FREE_KEYS |= {"train.lr", "train.max_skipped_share"}
# a checkpoint resumes on any number of processes, however they shard
FREE_KEYS |= {"train.gpus", "train.fsdp_prefetch", "train.fsdp_reshard"}


def step_folder(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / ROOT / f"step-{step:06d}"


def save(out_dir: Path, step: int, model: torch.nn.Module, cfg: config_mod.Config, state: dict[str, Any], keep: int,
         weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoints/step-NNNNNN atomically, then remove all but the newest `keep` (0 = keep all).
    weights: the trainable parameters whole, when the model's are sharded over several processes."""
    tmp = _begin(out_dir, step, f"{os.getpid()}")
    _save_weights(model, tmp, weights)
    return _commit(out_dir, step, tmp, cfg, state, keep)


def writes_sharded(cfg: config_mod.Config) -> bool:
    """Full fine-tuning on several processes checkpoints through DCP (runs/sharded.py): each rank writes
    its shard, instead of a whole model gathered onto rank 0."""
    return ranks.active() and cfg.method.name == "full"


def save_sharded(out_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 cfg: config_mod.Config, state: dict[str, Any], keep: int) -> Path:
    """save() for writes_sharded runs; all ranks call it. The trainer state holds no optimizer: the
    sharded folder does, and state["sharded"] records its files."""
    tmp = _begin(out_dir, step, "dcp") if ranks.is_main() else None
    ranks.barrier()  # the folder is there before any rank writes into it (one name on every rank)
    tmp = tmp or Path(out_dir) / ROOT / f".tmp-{step_folder(out_dir, step).name}-dcp"
    state = dict(state, sharded=sharded.save(tmp, model, optimizer))
    final = _commit(out_dir, step, tmp, cfg, state, keep) if ranks.is_main() else step_folder(out_dir, step)
    ranks.barrier()
    return final


def _begin(out_dir: Path, step: int, tag: str) -> Path:
    root = Path(out_dir) / ROOT
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{step_folder(out_dir, step).name}-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _commit(out_dir: Path, step: int, tmp: Path, cfg: config_mod.Config, state: dict[str, Any], keep: int) -> Path:
    """config.yaml, the trainer state and COMPLETE into `tmp`, every file fsynced, then renamed to its step."""
    root, final = Path(out_dir) / ROOT, step_folder(out_dir, step)
    (tmp / "config.yaml").write_text(config_mod.dump(cfg), encoding="utf-8")
    torch.save(state, tmp / STATE)
    (tmp / DONE).write_text(json.dumps({"step": step, "files": sorted(p.name for p in tmp.iterdir())}) + "\n")
    for p in [*tmp.glob(f"{sharded.DIR}/*"), *tmp.iterdir()]:
        _fsync(p)
    _fsync(tmp)
    if final.exists():  # only after a resume from an older step re-reaches it
        _remove(final)
    os.rename(tmp, final)
    _fsync(root)  # the rename itself reaches the disk
    prune(root, keep)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_weights(model: torch.nn.Module, folder: Path, weights: dict[str, torch.Tensor] | None = None) -> None:
    """The method's own save, plus the raw trainable parameters for peft methods (peft's file renames
    them, and a method may convert its adapter to fit the original base, so neither loads back into training)."""
    methods.save(model, folder, weights)
    if is_peft(model):
        state = weights if weights is not None else trainable_state(model)
        save_file(state, str(folder / RAW), metadata={"format": "pt", "writer": "slimtune"})


def complete(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under checkpoints/, oldest first."""
    found = []
    for p in Path(root).glob("step-*"):
        m = STEP.fullmatch(p.name)
        if m and (p / DONE).is_file() and (p / STATE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(out_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    found = complete(Path(out_dir) / ROOT)
    return found[-1][1] if found else None


def prune(root: Path, keep: int) -> None:
    """Remove all but the newest `keep` complete checkpoints (0 = keep all)."""
    found = complete(root)
    for _, old in found[:-keep] if keep else []:
        _remove(old)


def _remove(folder: Path) -> None:
    """Rename first, then delete: a kill mid-delete leaves an .old- folder, which is never picked and
    which clean() removes, not a step folder missing some of its files."""
    aside = folder.with_name(f".old-{folder.name}-{os.getpid()}")
    if aside.exists():  # this process pruned the same step before (a resume re-reached it)
        shutil.rmtree(aside)
    os.rename(folder, aside)
    _fsync(folder.parent)
    shutil.rmtree(aside, ignore_errors=True)


def clean(out_dir: Path) -> None:
    """Remove what killed runs left: half-written (.tmp-) and half-deleted (.old-) checkpoint folders."""
    for pattern in (".tmp-step-*", ".old-step-*"):
        for p in (Path(out_dir) / ROOT).glob(pattern):
            shutil.rmtree(p, ignore_errors=True)


def load(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Copy the checkpoint's trainable parameters into the model and its AdamW state into `optimizer`
    (when given), whatever the number of processes that wrote it and that read it; returns its trainer state."""
    folder = Path(folder)
    if sharded.present(folder):
        state = _load_state(folder / STATE)
        sharded.load(folder, model, optimizer, state.get("sharded"))
        return state
    weights = load_file(str(folder / (RAW if (folder / RAW).is_file() else PARTS)))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        odd = sorted(set(weights) ^ set(params))
        raise MismatchError(f"{folder}: its trainable parameters differ from this model's ({', '.join(odd[:4])}); "
                            "it was written by another model or method")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(local_part(value, params[name]))  # a sharded parameter takes its own part
    state = _load_state(folder / STATE)
    if optimizer is not None and ranks.active():
        ranks.load_optimizer_state(optimizer, state["optimizer"])
    elif optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    return state


def _load_state(path: Path) -> dict:
    """The trainer state, as plain tensors and Python values only: a pickle holding anything else (code
    to run) is refused with the file's name, never loaded."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeFileError(pickle_refused(path, err, "slimtune did not write it so; delete this checkpoint folder "
                                             "to resume from an earlier one, or start over with --overwrite")) from None


def differences(saved: config_mod.Config, cfg: config_mod.Config) -> list[str]:
    """`key: saved -> now` for every setting that would change what a resumed run trains. An auto split is
    compared as the split the saved run chose (config/batch.adopt)."""
    a, b = config_mod.to_dict(saved), config_mod.to_dict(adopt(saved, cfg))
    out = []
    for section in b:
        for key in b[section]:
            dotted = f"{section}.{key}"
            if dotted not in FREE_KEYS and a.get(section, {}).get(key) != b[section][key]:
                out.append(f"{dotted}: {a.get(section, {}).get(key)!r} there, {b[section][key]!r} now")
    return out


def rng_state() -> dict:
    """Python, NumPy, torch CPU and CUDA generators (dropout masks come from torch's)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np

        name, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = [name, keys.tolist(), pos, has_gauss, gauss]  # plain types: weights_only loads them
    except ImportError:  # pragma: no cover
        pass
    return state


def rng_states() -> dict:
    """The trainer state's RNG entries: this process's generators ("rng"), and on several processes every
    rank's ("rng_ranks"; all ranks call it). Each rank draws the dropout masks of its own share of a
    micro-batch, so its generator has moved on from rank 0's, and a resume restores each rank's own."""
    mine = rng_state()
    return {"rng": mine, "rng_ranks": ranks.all_gather_object(mine)} if ranks.active() else {"rng": mine}


def resume_rng(state: dict) -> None:
    """This rank's generators from a trainer state: its own where the checkpoint holds them (as many processes
    as wrote it, or fewer), else rank 0's, as every rank of a fresh run starts from the one train.seed.
    Checkpoints before rng_ranks hold rank 0's only."""
    saved, rank = state.get("rng_ranks") or [state["rng"]], ranks.rank()
    set_rng_state(saved[rank] if rank < len(saved) else state["rng"])


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


class StopOnSignal(SignalScope):
    """SIGINT, SIGTERM and SIGHUP during training ask for a checkpoint at the next step boundary instead of
    killing the run mid-step; the handlers step aside after the first, so a second signal stops at once."""

    def __init__(self, log: Callable[[str], None] = print) -> None:
        super().__init__()
        self.log, self.requested = log, None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = signal.Signals(signum).name
        self._restore()
        self.log(f"\n{self.requested}: saving a checkpoint after this step, then stopping "
                 "(send it again to stop at once)")
