"""Mean rewards on held-out prompts: `slimtune eval RUN --data prompts.jsonl [--reward file.py:fn]` samples the
run's completions of every prompt (greedy, or seeded sampling) and scores them with the rewards GRPO trains on: a
GRPO run's built-in rewards (its grpo.rewards) and the rewards named on the command line (a file's code runs only
when named there, never because a run folder says so)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from transformers import GenerationConfig

from .. import outputs
from ..config import ConfigError
from ..data.collate import pad_id
from ..data.prompts import PromptRecord, build_prompts
from ..engine import grpo_step
from ..engine.grpo_sample import completion_mask, left_pad, own_settings_only, sample, sample_seed
from ..objectives.rewards import Reward, score
from ..runs.adapter import READS, read_config
from ..trained import load_run
from .report import PREDICTIONS, SCORES, write_files

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import Config



@dataclass
class Decoding:
    """How completions are drawn: greedy (temperature 0, one per prompt) or sampled with a seed."""
    samples: int = 1  # completions per prompt
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0


@dataclass
class RewardReport:
    """Held-out mean rewards (scores.json) and every completion with its rewards (predictions.jsonl)."""
    scores: dict
    predictions: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        s = self.scores
        per = ", ".join(f"{k.split('/')[1]} {v:.4f}" for k, v in s.items() if k.startswith("rewards/"))
        return (f"eval: {s['prompts']} prompts x {s['samples']} completions ({s['decoding']}): mean reward "
                f"{s['reward']:.4f} ({per}); completion length {s['completion_length']:.1f} tokens")

    def write(self, folder: str | Path) -> Path:
        return write_files(folder, self.scores, self.predictions)


@torch.no_grad()
def greedy(model: torch.nn.Module, records: list[PromptRecord], max_new_tokens: int, pad: int, stops: list[int],
           device: str) -> dict[str, torch.Tensor]:
    """One greedy completion of each record, shaped as grpo_sample.sample returns them."""
    prompt_ids, prompt_mask = left_pad([r.prompt_ids for r in records], pad, device)
    gen = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stops, pad_token_id=pad,
                           use_cache=True)
    with own_settings_only(model):  # the argmax of the distribution GRPO samples, as sampled eval draws from it
        out = model.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=gen)
    completions = out[:, prompt_ids.shape[1]:]
    if completions.shape[1] == 0:
        completions = torch.full((len(out), 1), stops[0], device=out.device)
    mask = completion_mask(completions, stops)
    return {"completion_ids": completions.masked_fill(mask == 0, pad), "completion_mask": mask}


def complete(model: torch.nn.Module, records: list[PromptRecord], how: Decoding, objective: grpo_step.GrpoObjective,
             device: str, batch_size: int) -> list[tuple[PromptRecord, str, int]]:
    """(record, completion text, completion tokens) of `how.samples` completions of every record, record by record;
    sampling is seeded per batch of prompts (grpo_sample.sample_seed(seed, 0, batch))."""
    g = dataclasses.replace(objective.g, num_generations=how.samples, temperature=how.temperature or 1.0,
                            top_p=how.top_p, max_new_tokens=how.max_new_tokens)
    done = []
    for j in range(0, len(records), batch_size):
        rs = records[j:j + batch_size]
        if how.temperature > 0:
            b = sample(model, rs, g, objective.pad, objective.stops, device, sample_seed(how.seed, 0, j // batch_size))
        else:
            b = greedy(model, rs, how.max_new_tokens, objective.pad, objective.stops, device)
        per = [r for r in rs for _ in range(how.samples)]
        for r, ids, m in zip(per, b["completion_ids"], b["completion_mask"]):
            text = objective.tokenizer.decode(ids[m.bool()].tolist(), skip_special_tokens=True)
            done.append((r, text, int(m.sum())))
    return done


def score_prompts(model: torch.nn.Module, records: list[PromptRecord], objective: grpo_step.GrpoObjective,
                  how: Decoding, device: str, batch_size: int = 8) -> RewardReport:
    """Mean total reward and mean of each reward over every completion of every record."""
    if how.samples > 1 and how.temperature <= 0:
        raise ConfigError(f"eval --samples {how.samples}: greedy decoding gives one completion per prompt; add "
                          "--temperature (e.g. 1.0) to sample several")
    model.eval()
    done = complete(model, records, how, objective, device, batch_size)
    got = score(objective.rewards, [r.text for r, _, _ in done], [t for _, t, _ in done],
                [r.answer for r, _, _ in done], [n for _, _, n in done], [r.where for r, _, _ in done])
    decoding = "greedy" if how.temperature <= 0 else f"temperature {how.temperature:g}, seed {how.seed}"
    scores = {"prompts": len(records), "samples": how.samples, "decoding": decoding,
              "max_new_tokens": how.max_new_tokens, "reward": float(got.total.mean()),
              **{f"rewards/{name}/mean": float(v.mean()) for name, v in got.per.items()},
              "completion_length": sum(n for _, _, n in done) / len(done)}
    predictions = [{"where": r.where, "prompt": r.text, "completion": text, "tokens": n,
                    "reward": float(got.total[i]), **{name: float(v[i]) for name, v in got.per.items()}}
                   for i, (r, text, n) in enumerate(done)]
    return RewardReport(scores, predictions)


def objective_for(cfg: Config, tokenizer: PreTrainedTokenizerBase, user: tuple[Reward, ...]) -> \
        grpo_step.GrpoObjective:
    """The rewards a run is scored with: a GRPO run's built-in ones (grpo.rewards) and the user's; another run's
    built-in defaults are not its own, so it is scored by the user's alone."""
    if cfg.train.objective != "grpo":
        cfg = dataclasses.replace(cfg, grpo=dataclasses.replace(cfg.grpo, rewards=[]))
    return grpo_step.make(cfg, tokenizer, pad_id(tokenizer), user)


def main(folder: str, data: str, user: tuple[Reward, ...] = (), *, how: Decoding | None = None,
         output: str | None = None, batch_size: int = 8, device: str = "cpu", max_len: int = 0, limit: int = 0,
         trust_remote_code: bool = False, log: Callable[[str], None] = print) -> RewardReport:
    """`slimtune eval RUN --data prompts.jsonl [--reward f.py:fn]`: scores.json and predictions.jsonl into `output`
    (default RUN/eval-<data>). how: default greedy, up to the run's grpo.max_new_tokens, seeded by train.seed."""
    out = Path(output) if output else Path(folder) / f"eval-{Path(data).stem}"
    outputs.check(out, "eval --output", read_config(folder).model.path, [data], files=[SCORES, PREDICTIONS],
                  reads=[(f"the run's {name}", Path(folder) / name) for name in READS])
    model, tokenizer, cfg = load_run(folder, device, trust_remote_code=trust_remote_code)
    how = how or Decoding(max_new_tokens=cfg.grpo.max_new_tokens, seed=cfg.train.seed)
    objective = objective_for(cfg, tokenizer, user)
    cfg_data = dataclasses.replace(cfg.data, train=data, eval="", eval_size=0, max_len=max_len or cfg.data.max_len,
                                   limit=limit)
    records = build_prompts(cfg_data, tokenizer, grpo_step.needs_answer(objective), log).train
    report = score_prompts(model, records, objective, how, device, batch_size)
    report.scores = {"model": str(folder), "data": str(data), "trained_with": cfg.train.objective,
                     "rewards": [r.record() for r in objective.rewards], **report.scores}
    log(report.summary())
    report.write(out)
    log(f"wrote {out / SCORES} and {out / PREDICTIONS}")
    return report


__all__ = ["Decoding", "RewardReport", "complete", "greedy", "main", "objective_for", "score_prompts"]
