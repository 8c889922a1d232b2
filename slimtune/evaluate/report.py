"""`slimtune eval`: loss and perplexity on the answer tokens of held-out records, and with generation
EM / F1 / BLEU-4 / ROUGE (and item-set P/R/F1 for extraction), for a trained run or a bare base model.

`evaluate_run` is the one entry point: the eval command, the demo and (through a hook) the training
loop call it, so a number from any of them means the same thing. Records are rendered with the run's
template and system prompt, as in training; generation is greedy so scores are reproducible.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .. import config as config_mod
from .. import models, outputs
from ..config.batch import stated
from ..data import encode_examples, with_system
from ..data.collate import pad_id
from ..data.encode import Encoded
from ..data.readers import DataError, Example, read
from ..runs.metrics_log import LABELS, dumps, strict_json
from ..engine.loss import eval_loss
from ..engine.precision import base_dtype_name
from ..runs.adapter import READS, read_config
from ..trained import load_run
from ..kernels.select import use_chunked_loss
from . import cache as cache_mod
from . import metrics
from .generate import Sampling, answer_all as run_generation

if TYPE_CHECKING:
    import torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

Context = Callable[[], contextlib.AbstractContextManager]  # wraps each loss forward (the run's autocast)

# the scores a training run logs at each eval step (the others describe the setup, the same every time)
LOGGED = ("eval_loss", "eval_ppl", "eval_tokens", "em", "f1", "bleu4", "rouge1", "rouge2", "rougeL",
          "extraction_precision", "extraction_recall", "extraction_f1", "unfinished", "generate_seconds")

FILES = ("scores.json", "predictions.jsonl")  # what write_files puts in an eval folder
SCORES, PREDICTIONS = FILES


@dataclass
class Report:
    scores: dict
    predictions: list[dict] = field(default_factory=list)  # one row per record (only with generation)

    def summary(self) -> str:
        s = self.scores
        lines = [f"eval: {s['records']} records, {s['truncated']} truncated at max_len={s['max_len']}: loss "
                 f"{s['eval_loss']:.4f}, perplexity {s['eval_ppl']:.3f} over {s['eval_tokens']} answer tokens"]
        if s.get("no_answer"):
            lines[0] += f" ({s['no_answer']} records lost every answer token to truncation: not in the loss)"
        if "em" in s:
            lines.append(f"generation: {s['generated_tokens']} new tokens in {s['generate_seconds']:.1f} s "
                         f"({s['tokens_per_s']:.1f} tokens/s); {s['unfinished']} of {s['records']} answers hit "
                         f"max_new_tokens={s['max_new_tokens']}"
                         + (f"; {s['prompts_truncated']} prompts cut to their last {s['max_len']} tokens"
                            if s.get("prompts_truncated") else ""))
            lines.append("  ".join(f"{name} {s[key]:.2f}" for key, name in LABELS))
        if "extraction_f1" in s:
            lines.append(f"extraction (items split on {s['separator']!r}): precision {s['extraction_precision']:.2f} "
                         f"recall {s['extraction_recall']:.2f} F1 {s['extraction_f1']:.2f}")
        return "\n".join(lines)

    def row(self) -> dict:
        """The logged scores as metrics.jsonl keys, each eval_-prefixed (em -> eval_em, TensorBoard's eval/em)."""
        return {k if k.startswith("eval_") else f"eval_{k}": self.scores[k] for k in LOGGED if k in self.scores}

    def write(self, folder: str | Path) -> Path:
        """scores.json, and predictions.jsonl beside it when answers were generated."""
        return write_files(folder, self.scores, self.predictions,
                           lambda key, value: _why_not_finite(self.scores, key, value))


def write_files(folder: str | Path, scores: dict, predictions: list[dict],
                reason: Callable[[str, float], str] | None = None) -> Path:
    """An eval folder's files (every eval report writes them this way): scores.json, strict JSON with each
    non-finite score as null and `reason` (default: metrics_log.strict_json's) saying why, and predictions.jsonl
    beside it when there are predictions."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    clean = strict_json(scores, reason) if reason else strict_json(scores)
    (out / SCORES).write_text(json.dumps(clean, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                              encoding="utf-8")
    if predictions:
        with (out / PREDICTIONS).open("w", encoding="utf-8") as fh:
            for row in predictions:
                fh.write(dumps(row, ensure_ascii=False) + "\n")
    return out


def _why_not_finite(scores: dict, key: str, value: float) -> str:
    """The reason scores.json gives beside a null."""
    if scores.get("eval_tokens") == 0:
        return f"{value}: no record kept an answer token within max_len, so there is nothing to score"
    return (f"{value}: the model's loss over the answer tokens is not finite (its weights or outputs hold NaN/inf); "
            "this adapter is broken, train again with a lower train.lr")


def _loss(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: config_mod.Config,
          examples: list[Example], records: list[Encoded] | None, batch_size: int, device: str, context: Context,
          show_progress: bool = False, chunked: bool | None = None) -> dict:
    """Loss over the answer tokens only, whatever data.train_on_prompt was in training. chunked: the run plan's
    loss (None: train.loss on `device`, for a model evaluated outside a run)."""
    data_cfg = replace(cfg.data, train_on_prompt=False)
    stats = None
    if records is None:
        records, stats = encode_examples(examples, tokenizer, data_cfg)
    kept = [r for r in records if any(x != -100 for x in r.labels)]
    chunked = use_chunked_loss(cfg.train.loss, str(device)) if chunked is None else chunked
    out = eval_loss(model, kept, pad_id(tokenizer), batch_size, device, context, chunked, show_progress) if kept else \
        {"eval_loss": float("nan"), "eval_ppl": float("nan"), "eval_tokens": 0}
    out.update(records=len(records), no_answer=len(records) - len(kept), max_len=cfg.data.max_len,
               truncated=stats.truncated if stats else sum(r.truncated for r in records))
    return out


def _generation(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: config_mod.Config,
                examples: list[Example], sampling: Sampling, batch_size: int | None, device: str,
                separator: str | None, show_progress: bool = False) -> tuple[dict, list]:
    convs = [with_system(ex, cfg.data.system) for ex in examples]
    gen = run_generation(model, tokenizer, cfg.data.template, [c[:-1] for c in convs], sampling, batch_size,
                         device, max_len=cfg.data.max_len, show_progress=show_progress)
    refs = [c[-1]["content"] for c in convs]
    rows = []
    for ex, conv, ref, pred, toks, stopped in zip(examples, convs, refs, gen.texts, gen.tokens, gen.stopped):
        row = {"where": ex.where, "prompt": conv[-2]["content"], "reference": ref, "prediction": pred,
               "new_tokens": len(toks), "stopped": stopped}
        row.update({k: round(v, 6) for k, v in metrics.score_answer(pred, ref, separator).items()})
        rows.append(row)
    scores = metrics.corpus_scores(gen.texts, refs, separator)
    scores.update(generated_tokens=gen.new_tokens, generate_seconds=gen.seconds, tokens_per_s=gen.tokens_per_s,
                  unfinished=sum(not x for x in gen.stopped), max_new_tokens=sampling.max_new_tokens,
                  prompts_truncated=gen.truncated)
    if separator is not None:
        scores["separator"] = separator
    return scores, rows


def evaluate_run(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: config_mod.Config,
                 examples: list[Example], generate: bool = False, *, extraction_sep: str | None = None,
                 sampling: Sampling | None = None, batch_size: int = 8, gen_batch_size: int | None = None,
                 device: str = "cpu", context: Context = contextlib.nullcontext, records: list[Encoded] | None = None,
                 show_progress: bool = False, chunked: bool | None = None) -> Report:
    """Scores of a model on held-out records (each ending with the reference answer).

    Args:
        cfg: the run's config; its data.template, data.system and data.max_len render the records.
        records: the same examples already encoded (the training loop's held-out set), to skip encoding.
        context: wraps each loss forward (the training loop's autocast).
        extraction_sep: also score answers as item sets split on this separator (implies generate).
        batch_size: records per loss forward; gen_batch_size: prompts per generate call (None: 64 on
            CUDA, 8 on the CPU).
        show_progress: bars on stderr for the loss pass and the generation (records, time left).
        chunked: the loss a chunk of rows at a time (the run plan's); None: as train.loss decides on `device`.
    """
    scores = _loss(model, tokenizer, cfg, examples, records, batch_size, device, context, show_progress, chunked)
    rows: list[dict] = []
    if generate or extraction_sep is not None:
        gen_scores, rows = _generation(model, tokenizer, cfg, examples, sampling or Sampling(max_new_tokens=256),
                                       gen_batch_size, device, extraction_sep, show_progress)
        scores.update(gen_scores)
    return Report(scores, rows)


def in_training(tokenizer: PreTrainedTokenizerBase, cfg: config_mod.Config, examples: list[Example],
                records: list[Encoded], device: str, show_progress: bool = False,
                train_records: list[Encoded] | None = None, log: Callable[[str], None] = print,
                chunked: bool = False) -> InTraining:
    """The training loop's hook, (model, context, step) -> Report, per the train.eval_* keys (see InTraining);
    chunked: the run plan's loss."""
    return InTraining(tokenizer, cfg, examples, records, device, show_progress, train_records, log, chunked)


class InTraining:
    """Scores the held-out split during training: the loss over the records within train.eval_max_tokens,
    generation over the first train.eval_max_records of them. Says before each eval how long it will take;
    the eval before training (step 0) is kept in a cache beside the run folder and reused by the next run
    from the same model, data and method (evaluate/cache.py)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: config_mod.Config, examples: list[Example],
                 records: list[Encoded], device: str, show_progress: bool = False,
                 train_records: list[Encoded] | None = None, log: Callable[[str], None] = print,
                 chunked: bool = False) -> None:
        tc = cfg.train
        self.chunked = chunked  # the run plan's loss, as training computes it
        self.tokenizer, self.cfg, self.device, self.show_progress, self.log = tokenizer, cfg, device, show_progress, log
        self.sep = tc.eval_separator.replace("\\n", "\n").replace("\\t", "\t") or None  # as eval's --separator
        self.generate = tc.eval_generate or self.sep is not None
        n = _within(records, eval_token_cap(cfg, records, train_records))
        if n < len(records):
            log(f"eval: the first {n} of {len(records)} held-out records ({_tokens(records[:n]):,} of "
                f"{_tokens(records):,} tokens) per evaluation: train.eval_max_tokens={tc.eval_max_tokens} "
                f"({'auto: in proportion to the run' if tc.eval_max_tokens < 0 else 'set'}); 0 evaluates all")
        self.examples, self.records = examples[:n], records[:n]
        self.subset = self.examples[:tc.eval_max_records] if tc.eval_max_records else self.examples
        self.sampling = Sampling(max_new_tokens=tc.eval_max_new_tokens)
        self.seconds_per_unit: float | None = None  # measured by the last eval (see _units)

    def __call__(self, model: nn.Module, context: Context = contextlib.nullcontext, step: int | None = None) -> Report:
        stored = cache_mod.path(self.cfg.train.output_dir, self._key()) if step == 0 else None
        found = cache_mod.load(stored) if stored else None
        if found is not None:
            self.log(f"eval before training: reused from {stored} (same model files, held-out records, method "
                     "and seed; delete it to measure again)")
            return Report(found["scores"], found["predictions"])
        self.log(self._estimate(model, context, step))
        start = time.perf_counter()
        with context():  # generation too runs under the run's autocast: bf16 bases hold fp32 trainables
            # the loss covers every record within the cap (`records`); the examples are the ones generated for
            report = evaluate_run(model, self.tokenizer, self.cfg, self.subset, self.generate, extraction_sep=self.sep,
                                  sampling=self.sampling, batch_size=self.cfg.train.micro_batch_size,
                                  device=self.device, records=self.records, show_progress=self.show_progress,
                                  chunked=self.chunked)
        seconds = time.perf_counter() - start
        self.seconds_per_unit = seconds / max(self._units(), 1)
        report.scores["eval_seconds"] = seconds
        if self.generate:
            report.scores["generated_records"] = len(self.subset)
        if stored:
            cache_mod.store(stored, report.scores, report.predictions)
        return report

    def _key(self) -> str:
        settings = {"generate": self.generate, "sep": self.sep, "max_new_tokens": self.sampling.max_new_tokens,
                    "generated_records": len(self.subset)}
        return cache_mod.key(self.cfg, self.records, self.device, settings)

    def _units(self) -> int:
        """Work of one eval in token forwards: the loss pass, plus (generating) every prompt's prefill and up
        to max_new_tokens decode steps per record."""
        gen = sum(len(r.input_ids) + self.sampling.max_new_tokens for r in self.records[:len(self.subset)]) \
            if self.generate else 0
        return _tokens(self.records) + gen

    def _estimate(self, model: nn.Module, context: Context, step: int | None) -> str:
        """The eval's size and time: from the last eval's pace, or before the first from one timed batch."""
        if self.seconds_per_unit is None:
            self.seconds_per_unit = _probe(model, self.records, self.cfg, self.tokenizer, self.device, context,
                                           self.chunked)
        what = f"{len(self.records)} records, {_tokens(self.records):,} tokens"
        if self.generate:
            what += f", generating up to {self.sampling.max_new_tokens} tokens for {len(self.subset)}"
        at = "before training" if step == 0 else f"at step {step}"
        return f"eval {at}: {what}; about {self.seconds_per_unit * self._units():.1f} s"


def _tokens(records: list[Encoded]) -> int:
    return sum(len(r.input_ids) for r in records)


def _within(records: list[Encoded], cap: int) -> int:
    """How many leading records fit in `cap` tokens (at least one; cap 0: all)."""
    total = 0
    for n, r in enumerate(records):
        total += len(r.input_ids)
        if cap and total > cap and n > 0:
            return n
    return len(records)


# the auto cap's floor: fewer answer tokens than this make a noisy loss (and are quick anyway)
MIN_EVAL_TOKENS = 4096


def eval_token_cap(cfg: config_mod.Config, records: list[Encoded], train_records: list[Encoded] | None = None) -> int:
    """Tokens one in-training eval may cover (0: all). train.eval_max_tokens=-1 (auto): a forward costs about a
    third of a training step's forward+backward per token, so evals (before, after, every eval_every) of at
    most 3/4 of the run's training tokens, shared among them, take at most about a quarter of the training
    time; never below MIN_EVAL_TOKENS. A 5-step CPU run once spent 10 of 13 minutes on two evals of 100 records."""
    tc = cfg.train
    if tc.eval_max_tokens >= 0 or not train_records:
        return max(tc.eval_max_tokens, 0)
    # as engine.loop.total_steps counts them unpacked (that module imports this one)
    _, micro, accum = stated(tc)  # train resolves an auto split before this; a direct caller gets the stated one
    steps = tc.max_steps or max(1, math.ceil(math.ceil(len(train_records) / micro) / accum * tc.epochs))
    per_step = _tokens(train_records) / len(train_records) * micro * accum
    evals = 1 + int(tc.eval_at_start) + ((steps - 1) // tc.eval_every if tc.eval_every else 0)  # the last is after
    return max(MIN_EVAL_TOKENS, int(0.75 * steps * per_step / evals))


def _probe(model: torch.nn.Module, records: list[Encoded], cfg: config_mod.Config,
           tokenizer: PreTrainedTokenizerBase, device: str, context: Context, chunked: bool) -> float:
    """Seconds per token of one loss forward over the first micro-batch (the estimate before the first eval)."""
    first = records[:cfg.train.micro_batch_size]
    start = time.perf_counter()
    eval_loss(model, first, pad_id(tokenizer), len(first), device, context, chunked)
    return (time.perf_counter() - start) / max(_tokens(first), 1)


def load_model(folder: str | None, base: str | None, template: str, device: str, system: str = "",
               trust_remote_code: bool = False):
    """(model, tokenizer, cfg) of a run folder, or of a base model with no adapter and the given template;
    the model's own code runs only with the user's trust_remote_code, never a run's config.yaml."""
    if folder:
        return load_run(folder, device, trust_remote_code=trust_remote_code)
    cfg = config_mod.load(None, [f"model.path={base}", f"data.template={template}", f"data.system={system}",
                                 f"model.trust_remote_code={bool(trust_remote_code)}"])
    model, tokenizer = models.load(cfg.model.path, base_dtype_name(cfg, device), cfg.model.trust_remote_code, device)
    return model.eval(), tokenizer, cfg


def main(folder: str | None, data: str, *, base: str | None = None, template: str = "auto",
         output: str | None = None, generate: bool = False, extraction_sep: str | None = None,
         sampling: Sampling | None = None, batch_size: int | None = None, device: str = "cpu", limit: int = 0,
         max_len: int = 0, system: str | None = None, trust_remote_code: bool = False,
         log: Callable[[str], None] = print, show_progress: bool = False) -> Report:
    """The eval command: load, score, print, write scores.json (+ predictions.jsonl) into `output`."""
    if bool(folder) == bool(base):
        raise DataError("eval: give either a run folder or --base MODEL (the base model with no adapter)")
    out = Path(output) if output else (Path(folder) / f"eval-{Path(data).stem}" if folder else
                                       Path(f"eval-{Path(str(base)).name}-{Path(data).stem}"))
    runs = [(f"the run's {name}", Path(folder) / name) for name in READS] if folder else []
    outputs.check(out, "eval --output", read_config(folder).model.path if folder else base, [data],
                  files=FILES, reads=runs)
    examples = read(data, limit=limit)
    model, tokenizer, cfg = load_model(folder, base, template, device, system or "", trust_remote_code)
    if max_len:
        cfg.data.max_len = max_len
    if system is not None:
        cfg.data.system = system
    start = time.perf_counter()
    report = evaluate_run(model, tokenizer, cfg, examples, generate, extraction_sep=extraction_sep,
                          sampling=sampling, batch_size=batch_size or 8, gen_batch_size=batch_size,
                          device=device, show_progress=show_progress)
    report.scores = {"model": str(folder or base), "data": str(data), "template": cfg.data.template,
                     **report.scores, "seconds": time.perf_counter() - start}
    log(report.summary())
    report.write(out)
    log(f"wrote {out / 'scores.json'}" + (f" and {out / 'predictions.jsonl'}" if report.predictions else ""))
    return report
