"""A run's state as named, typed fields: what the loop carries from step to step (`Run`), the part of it a
checkpoint keeps (`Tally`, beside the counters, optimizer and stream), what only the end knows (`Ending`),
and the result dict fit returns, built once from them at the end (`result`).

Nothing here is read back from the result: the step reads `Run.kernels`, a resume restores `Tally`, so a
resumed run takes this run's kernel choices (train.loss, train.fused_* may change on a resume) and the
checkpoint's tallies, each from its own field."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.stream import MicroBatches
from ..kernels.select import Kernels
from .precision import Dtypes
from .timing import StepClock


@dataclass
class Tally:
    """What the run has recorded so far; a checkpoint keeps it (its "result" entry) and a resume goes on from it."""
    start_max_abs: float | None = None  # largest trainable |weight| before step 1 (a resume keeps the first run's)
    skipped_steps: int = 0  # fp16 overflows: updates the GradScaler skipped
    nan_steps: int = 0  # NaN/inf loss or gradient: updates skipped (train.on_nan=skip)
    train_loss: float | None = None  # the last step's
    eval_before: dict | None = None  # held-out scores before step 1 (train.eval_at_start)

    def state_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def load_state_dict(self, saved: dict) -> None:
        """A checkpoint's "result" entry. Older slimtune wrote its whole result dict there (steps, precision,
        kernel keys...): only the tallies are read back, the rest is this run's own."""
        for f in dataclasses.fields(self):
            if f.name in saved:
                setattr(self, f.name, saved[f.name])


@dataclass
class Ending:
    """What only the end of this process's run knows; never in a checkpoint."""
    interrupted: str | None = None  # the signal's name (SIGINT, SIGTERM, SIGHUP) when one stopped the run
    stopped_at: int | None = None  # the step it stopped after
    eval_after: dict | None = None  # held-out scores after the last step
    eval_dir: str | None = None  # where they were written (rank 0)
    peak_allocated_gib: float | None = None  # CUDA only
    peak_reserved_gib: float | None = None


@dataclass
class Run:
    """What the loop carries from step to step; all of it but `end` goes into a checkpoint."""
    model: torch.nn.Module
    cfg: object
    dtypes: Dtypes
    device: str
    out_dir: Path
    steps: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    stream: MicroBatches
    data: dict  # fingerprint of the training data
    kernels: Kernels = Kernels()  # the fast paths on (kernels/select.py): what the step and the eval read
    tally: Tally = field(default_factory=Tally)
    end: Ending = field(default_factory=Ending)
    step: int = 0  # optimizer steps done
    seen: int = 0  # input tokens (padding excluded) of the steps done
    trained: int = 0  # of them, the tokens with a label (the answers): what the loss averages over
    elapsed: float = 0.0  # training seconds, those of the runs this one resumes included
    losses: list[float] = field(default_factory=list)  # recent losses, for the NaN message
    clock: StepClock = field(default_factory=StepClock)  # this process's step times (engine/timing.py)
    objective: object | None = None  # a preference objective's step (engine/preference_step.py); None: answers


def result(run: Run) -> dict:
    """What fit returns (and train writes to summary.json): steps, precision, the kernel record, tallies,
    evaluation scores and timings. Keys whose value this run never learned (no eval, no GPU) are left out."""
    seconds = max(run.elapsed, 1e-9)
    out = {"steps": run.steps, "precision": run.dtypes.name, **run.kernels.as_dict(), **run.tally.state_dict(),
           **{k: v for k, v in dataclasses.asdict(run.end).items() if v is not None}}
    out.update(train_seconds=run.elapsed, input_tokens_per_s=run.seen / seconds,
               trained_tokens_per_s=run.trained / seconds, **run.clock.summary())
    return out
