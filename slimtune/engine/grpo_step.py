"""The training step of train.objective=grpo: sample G completions of each prompt, score them with the rewards,
turn the rewards into group-relative advantages, and take the clipped policy step (objectives/grpo.py).

`fit` takes a `GrpoObjective` (the same hook as the preference objectives) and hands it each step's
micro-batches of prompts: a micro-batch of train.micro_batch_size prompts is sampled and trained as
micro_batch_size x num_generations rows, and train.grad_accum of them make a step. With
grpo.steps_per_generation = N the completions of a step are trained on for N optimizer steps (the stream hands
out the same prompts again, and their completions, old log-probabilities and advantages are kept in it, so a
checkpoint holds them and a resume goes on with them)."""
from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..config import ConfigError, TrainConfig
from ..config.convert import AUTO
from ..config.fields import GrpoConfig
from ..data.prompts import PromptRecord, fingerprint
from ..data.stream import MicroBatches
from ..kernels.lora_math import cast_once
from ..objectives import grpo
from ..data.templates import stop_ids as template_stops
from ..objectives.rewards import NEEDS_ANSWER, Reward, RewardError, Scored, builtins, score, write_record
from . import decode, distributed, grpo_memory
from .decode import StaticDecoder
from .grpo_memory import GrpoEstimate
from .grpo_sample import cache_length, check_reference, completion_logps, reference_logps, sample, sample_seed, \
    stop_ids
from .loss import as_root_forward, sharded
from .step import apply_update, clip_and_read

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .run_plan import RunPlan
    from .state import Run


class Generations(MicroBatches):
    """Micro-batches of prompts, each step's handed out `reuse` steps running (grpo.steps_per_generation);
    `buffer` holds the completions sampled for them, which the checkpoint keeps with the stream's position."""

    def __init__(self, records: list[PromptRecord], size: int, seed: int, accum: int, reuse: int):
        super().__init__(records, size, seed)
        self.accum, self.reuse, self.calls = accum, reuse, 0
        self.held: list[list[int]] = []  # record indices of this generation's micro-batches
        self.buffer: dict | None = None  # the GRPO step's completions of `held`
        self._index = {id(r): i for i, r in enumerate(records)}

    def __next__(self) -> list[PromptRecord]:
        k = self.calls % (self.accum * self.reuse)
        self.calls += 1
        if k >= self.accum:
            return [self.records[i] for i in self.held[k % self.accum]]
        if k == 0:
            self.held = []
        batch = super().__next__()
        self.held.append([self._index[id(r)] for r in batch])
        return batch

    def state_dict(self) -> dict:
        return super().state_dict() | {"calls": self.calls, "held": self.held, "buffer": self.buffer}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.calls, self.held, self.buffer = state.get("calls", 0), state.get("held", []), state.get("buffer")


@dataclass
class GrpoObjective:
    """What `fit` needs to train on rewards of sampled completions instead of answers."""
    g: GrpoConfig
    rewards: list[Reward]
    tokenizer: Any  # PreTrainedTokenizerBase: decodes completions for the rewards
    pad: int
    stops: list[int]  # token ids that end a completion
    skip_bad: bool = False  # data.on_bad_record=skip: a completion a reward fails on is left out
    cfg: Any = None  # the run's Config (make's): the memory estimate reads its method and train.*
    estimate: GrpoEstimate | None = None  # the memory estimate start() logged
    decoder: StaticDecoder | None = None  # grpo.decode=compiled: the static cache and compiled step, from start()
    packed: bool = False  # the training passes over each micro-batch as one packed row (set by stream)

    fingerprint = staticmethod(fingerprint)

    def stream(self, records: list[PromptRecord], tc: TrainConfig, packing: str = "off") -> Generations:
        """The prompts' stream; with the run's packing on, the log-prob passes run over packed rows."""
        self.packed = packing != "off"
        return Generations(records, tc.micro_batch_size, tc.seed, tc.grad_accum, self.g.steps_per_generation)

    def start(self, model: torch.nn.Module, splits: dict[str, list[PromptRecord]], out_dir: Path, device: str,
              batch_size: int, context: Callable = contextlib.nullcontext,
              log: Callable[[str], None] = print, plan: RunPlan | None = None) -> None:
        """Checks that need the model, the memory estimate (with the run's `plan`; none without one), and the run
        folder's record of the rewards (the user's files' sha256, which a resume checks), before step 1."""
        check_reference(model, self.g)
        if distributed.size() > 1:
            synced_generation(model)
        if distributed.is_main():
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            write_record(out_dir, self.rewards)
        self.decoder = decode.make(model, self.g.decode, device, cache_length(splits["train"], self.g), log)
        if plan is not None and self.cfg is not None:
            self.estimate, line = grpo_memory.predict(model.config, plan, splits["train"], plan.apply(self.cfg),
                                                      kept=self.decoder is not None)
            log(line)
        log("grpo rewards: " + ", ".join(f"{r.name} x{r.weight:g} ({r.source})" for r in self.rewards))

    def loss_config(self) -> grpo.LossConfig:
        g = self.g
        return grpo.LossConfig(g.loss_type, g.epsilon, g.epsilon_high, g.beta, g.max_new_tokens)

    def step(self, run: Run, records: list[list[PromptRecord]], context: Callable) -> dict:
        """One optimizer step: sample and score (on a generation's first step), then the clipped loss of every
        micro-batch, backward, clip and update. The loop's row plus the rewards' metrics, gen_s and train_s."""
        began = time.perf_counter()
        stream = run.stream
        if run.step % self.g.steps_per_generation == 0 or stream.buffer is None:
            stream.buffer = self.generate(run, records, run.step // self.g.steps_per_generation, context)
        gen_s = time.perf_counter() - began
        # a resumed run's kept completions come back from the checkpoint on the CPU
        batches = [{k: v.to(run.device) for k, v in b.items()} for b in stream.buffer["batches"]]
        metrics = dict(stream.buffer["metrics"])
        cfg, world = self.loss_config(), distributed.size()
        # the loss is normalised by the whole step's counts, every process's completions included
        step_tokens, step_rows = (int(x) for x in distributed.all_sum(
            [sum(int(b["mask"].sum()) for b in batches), sum(int(b["mask"].any(dim=1).sum()) for b in batches)],
            run.device))
        total = torch.zeros((), dtype=torch.float64, device=run.device)
        kl = clipped = 0.0
        with cast_once():  # each adapter cast once for the step's forwards and backwards
            for b in batches:
                with context():
                    logps = completion_logps(run.model, b, self.g.temperature, packed=self.packed)
                old = b["old_logps"] if "old_logps" in b else logps.detach()
                parts = grpo.policy_loss(logps, old, b["advantages"], b["mask"], cfg, b.get("ref_logps"),
                                         max(step_tokens, 1), max(step_rows, 1))
                scaled = parts.loss * world if world > 1 else parts.loss  # FSDP averages the gradients over processes
                (run.scaler.scale(scaled) if run.scaler.is_enabled() else scaled).backward()
                total += parts.loss.detach().double()
                kl, clipped = kl + parts.kl * parts.tokens, clipped + parts.clipped * parts.tokens
        distributed.all_sum_(total)
        kl, clipped, seen, computed = distributed.all_sum(
            [kl, clipped, sum(int(b["prompt_mask"].sum() + b["completion_mask"].sum()) for b in batches),
             sum(int(b["prompt_mask"].sum() + b["completion_mask"].sum()) if self.packed
                 else b["prompt_ids"].numel() + b["completion_ids"].numel() for b in batches)], run.device)
        read = clip_and_read(run.optimizer, run.cfg.train.max_grad_norm, run.scaler, total)
        row = apply_update(run.optimizer, run.scheduler, run.scaler, read, {"loss": read[0]})
        if (run.step + 1) % self.g.steps_per_generation == 0:  # its last step: no checkpoint needs to keep them
            stream.buffer = None
        run.seen += int(seen)
        metrics.update(kl=kl / max(step_tokens, 1), clip_ratio=clipped / max(step_tokens, 1), gen_s=gen_s,
                       train_s=time.perf_counter() - began - gen_s)
        row.update(metrics, trained_tokens=step_tokens, data_s=0.0, computed_tokens=int(computed))
        return row

    def generate(self, run: Run, records: list[list[PromptRecord]], generation: int, context: Callable) -> dict:
        """Completions of every micro-batch of the step, their rewards and advantages (advantages compare the
        completions of one prompt; scale_rewards=batch takes the std over the whole step), the old log-probs
        (steps_per_generation > 1) and the reference's (beta > 0)."""
        g, tc = self.g, run.cfg.train
        rank, world = distributed.rank(), distributed.size()
        batches, scored, lengths = [], [], []
        for j, everyone in enumerate(records):
            share = len(everyone) // world  # whole prompts per process: a group of G never straddles two
            rs = everyone[rank * share:(rank + 1) * share]
            b = draw(run.model, rs, g, self.pad, self.stops, run.device,
                     sample_seed(tc.seed, generation, j * world + rank), context, self.decoder)
            texts = [self.tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
                     for ids, m in zip(b["completion_ids"], b["completion_mask"])]
            n = [int(x) for x in b["completion_mask"].sum(dim=1)]
            per = [r for r in rs for _ in range(g.num_generations)]  # each prompt's record for its G completions
            scored.append(score(self.rewards, [r.text for r in per], texts, [r.answer for r in per], n,
                                [r.where for r in per], self.skip_bad))
            batches.append(b)
            lengths += n
        scored, lengths, total, mine = gather_rewards(scored, lengths)
        adv, keep = advantages(total, g.num_generations, g.scale_rewards)
        start = mine
        for b in batches:
            rows = b["completion_ids"].shape[0]
            b["advantages"] = adv[start:start + rows].to(run.device)
            b["mask"] = b["completion_mask"] * keep[start:start + rows].to(run.device).unsqueeze(1)
            start += rows
            if g.steps_per_generation > 1:
                with torch.no_grad(), context():
                    b["old_logps"] = completion_logps(run.model, b, g.temperature, packed=self.packed).detach()
            if g.beta > 0:
                b["ref_logps"] = reference_logps(run.model, b, g.temperature, context, self.packed)
        return {"batches": batches, "metrics": reward_metrics(scored, total, keep, lengths, g)}


def draw(model: torch.nn.Module, records: list[PromptRecord], g: GrpoConfig, pad: int, stops: list[int], device: str,
         seed: int, context: Callable, decoder: StaticDecoder | None = None) -> dict[str, torch.Tensor]:
    """grpo_sample.sample (through `decoder` where one is given); under FSDP2 run as the model's forward, so the
    root's hooks gather the embeddings and head around the whole generation (and its first forward sets FSDP up as
    the root's, not a layer's), through transformers' generate, whose synced_gpus keeps every process stepping
    until all have stopped (the static decoder does not)."""
    if not sharded(model):
        return sample(model, records, g, pad, stops, device, seed, context, decoder)
    return as_root_forward(model, lambda batch, forward: sample(model, records, g, pad, stops, device, seed, context),
                           {})


def synced_generation(model: torch.nn.Module) -> None:
    """Marks the model's generating modules as FSDP-managed, so transformers' generate runs with synced_gpus: a
    process whose completions have all ended keeps taking decoding steps (discarded) until every process's have,
    since each step's forward all-gathers the sharded layers and every process must join it."""
    for m in model.modules():
        if hasattr(m, "generate"):
            m._is_fsdp_managed_module = True


def gather_rewards(scored: list[Scored], lengths: list[int]) -> tuple[list[Scored], list[int], torch.Tensor, int]:
    """Every process's rewards and completion lengths in rank order (the scale_rewards=batch std and the logged
    means are over the whole step), their totals, and where this process's rows start among them."""
    if distributed.size() == 1:
        return scored, lengths, torch.cat([s.total for s in scored]), 0
    everyone = distributed.all_gather_object((scored, lengths))
    start = sum(len(n) for _, n in everyone[:distributed.rank()])
    scored, lengths = [s for part, _ in everyone for s in part], [x for _, n in everyone for x in n]
    return scored, lengths, torch.cat([s.total for s in scored]), start


def check_processes(cfg: Any, world: int) -> None:
    """Refuse, in one line, what GRPO cannot run on `world` processes: each process samples and trains whole
    groups of its own prompts of every micro-batch."""
    mb, reuse = cfg.train.micro_batch_size, cfg.grpo.steps_per_generation
    if mb != AUTO and mb % world:
        raise ConfigError(f"train.micro_batch_size={mb} on {world} processes: each process samples the G completions "
                          f"of whole prompts, so a micro-batch's prompts must split evenly; make it a multiple of "
                          f"{world} (auto takes {world})")
    if reuse > 1:
        raise ConfigError(f"grpo.steps_per_generation={reuse} on {world} processes: the completions kept between "
                          "steps are each process's own, and a checkpoint (written by rank 0) would hold rank 0's "
                          "only; use grpo.steps_per_generation=1, or one process")


def make(cfg: Any, tokenizer: PreTrainedTokenizerBase, pad: int, user: tuple[Reward, ...] = ()) -> GrpoObjective:
    """The GRPO step for a config: its built-in rewards (grpo.rewards) and the user's, the template's stops."""
    if distributed.size() > 1:
        check_processes(cfg, distributed.size())
    chosen = builtins(cfg.grpo) + list(user)
    names = [r.name for r in chosen]
    if dup := next((n for n in names if names.count(n) > 1), None):
        raise RewardError(f"two rewards are named {dup!r}; each reward's metrics are logged by its name: rename one")
    if not chosen:
        raise RewardError("grpo: no reward given; set grpo.rewards (built-ins) or pass --reward file.py:fn")
    return GrpoObjective(cfg.grpo, chosen, tokenizer, pad, stop_ids(tokenizer, template_stops(cfg.data.template,
                         tokenizer)), cfg.data.on_bad_record == "skip", cfg)


def one_prompt_per_micro_batch(cfg: Any, log: Callable[[str], None] = print, world: int = 0) -> Any:
    """cfg with an auto train.micro_batch_size set to 1 prompt per process: a GRPO micro-batch is G rows a prompt,
    which the batch split's memory estimate (one row a record) does not count, and 1 x G rows is TRL's default.
    world: the processes (default: this run's; an estimate passes the GPUs it is asked about)."""
    if cfg.train.micro_batch_size != AUTO:
        return cfg
    world = world or distributed.size()
    log(f"grpo: train.micro_batch_size=auto takes 1 prompt ({cfg.grpo.num_generations} completions) per micro-batch"
        + (f" on each of {world} processes" if world > 1 else ""))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, micro_batch_size=world))


def needs_answer(objective: GrpoObjective) -> bool:
    """Whether a built-in reward compares with the reference answer, which every record must then have."""
    return any(r.source == "built-in" and r.name in NEEDS_ANSWER for r in objective.rewards)


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """The unbiased standard deviation of the values that are not NaN (TRL's nanstd): inf where one value is left,
    NaN where none is."""
    mean = torch.nanmean(x, dim=dim, keepdim=True) if dim is not None else torch.nanmean(x)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=keepdim) if dim is not None else (~torch.isnan(x)).sum()
    squares = torch.nansum((x - mean) ** 2, dim=dim, keepdim=keepdim) if dim is not None else torch.nansum(
        (x - mean) ** 2)
    return torch.sqrt(squares / (count - 1))


def advantages(total: torch.Tensor, group: int, scale: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage, kept) of every completion, as TRL computes them when a reward could not score a completion
    (NaN): that completion is left out (advantage 0, kept 0) and its group's mean and std, or the step's std
    (scale_rewards=batch), are taken over the others."""
    failed = torch.isnan(total)
    if not failed.any():
        return grpo.advantages(total, group, scale), torch.ones_like(total, dtype=torch.long)
    grouped = total.double().view(-1, group)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (nanstd(grouped, dim=1, keepdim=True) + grpo.STD_EPS)
    elif scale == "batch":
        centred = centred / (nanstd(total.double()) + grpo.STD_EPS)
    adv = torch.nan_to_num(centred.reshape(-1), nan=0.0, posinf=0.0, neginf=0.0).float()
    return adv.masked_fill(failed, 0.0), (~failed).long()


def reward_metrics(scored: list[Scored], total: torch.Tensor, keep: torch.Tensor, lengths: list[int],
                   g: GrpoConfig) -> dict[str, float]:
    """The step's reward numbers over the completions that were scored (TRL's names): mean and std of the total
    and of each reward, the share of groups whose rewards are all equal (they teach nothing), completion lengths."""
    out: dict[str, float] = {}
    good = total[keep.bool()]
    if good.numel():
        spread = nanstd(total.view(-1, g.num_generations), dim=1)
        scored_groups = ~torch.isnan(spread)
        out.update(reward=float(good.mean()), reward_std=float(nanstd(total)) if good.numel() > 1 else 0.0,
                   frac_reward_zero_std=float(torch.isclose(spread[scored_groups],
                                                            torch.zeros_like(spread[scored_groups])).double().mean()))
        for name in scored[0].per:
            values = torch.cat([s.per[name] for s in scored])
            out[f"rewards/{name}/mean"] = float(torch.nanmean(values))
            out[f"rewards/{name}/std"] = float(nanstd(values)) if (~torch.isnan(values)).sum() > 1 else 0.0
    n = torch.tensor(lengths, dtype=torch.float64)
    out.update(completion_length=float(n.mean()),
               completions_clipped=float((n >= g.max_new_tokens).double().mean()),
               reward_failures=float(sum(s.failed for s in scored)))
    return out


