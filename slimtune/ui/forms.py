"""The Setup page's answers: the config from the form, the data preview, the memory estimate and fit advice,
parameter counts. Each calls the function the CLI calls (config.from_dict, data.read + encode_examples as
`slimtune inspect`, engine.memory as `slimtune estimate`, methods.count_on_meta as `slimtune params`), so a
form shows the numbers and the error text the command line would."""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable
from typing import Any

from .. import config as config_mod
from .. import models
from ..config.fields import GrpoConfig, PreferenceConfig
from ..data import encode_examples, pref_read, read
from ..data.encode import segments
from ..data.pref_encode import encode_records, summary
from ..data.preference import for_objective
from ..engine import grpo_step, memory, preference_step, preflight, run_plan, split
from ..engine import reference as pref_reference
from ..errors import SlimtuneError
from ..methods import count_on_meta
from .paths import PathRefused, Roots

FIELD = re.compile(r"\b((?:model|data|method|train|preference|grpo)\.\w+)")
PREVIEW_RECORDS = 200  # records read for the preview's counts: enough to see truncation, quick on any file
# the knobs each preference objective reads (objectives.loss), shown when the form picks it
OBJECTIVE_FIELDS = {"sft": [], "dpo": ["train.reference", "preference.beta", "preference.label_smoothing"],
                    "ipo": ["train.reference", "preference.beta"],
                    "simpo": ["preference.beta", "preference.simpo_gamma"],
                    "orpo": ["preference.orpo_lambda"],
                    "kto": ["train.reference", "preference.beta", "preference.kto_desirable_weight",
                            "preference.kto_undesirable_weight"],
                    # the built-in rewards only: a reward written in Python runs only when the command line names it
                    "grpo": ["grpo.rewards", "grpo.num_generations", "grpo.max_new_tokens", "grpo.loss_type",
                             "grpo.beta", "grpo.temperature"]}
PAIRS = 'pairs JSONL: {"prompt", "chosen", "rejected"} (TRL), or LLaMA-Factory\'s alpaca/ShareGPT pairs'
DATA_HINTS = {"sft": "answers JSONL: alpaca {\"instruction\", \"output\"} or {\"messages\": [...]}",
              "dpo": PAIRS, "ipo": PAIRS, "simpo": PAIRS, "orpo": PAIRS,
              "kto": 'labelled answers JSONL: {"prompt", "completion", "label": true|false}, or pairs (each answer '
                     "becomes one record)",
              "grpo": 'prompts JSONL: {"prompt", "answer"}, alpaca (output = the reference answer) or messages'}


class FormError(SlimtuneError):
    """A form's input the CLI would refuse: `fields` maps a dotted key to the CLI's message for it."""

    def __init__(self, fields: dict[str, str]):
        super().__init__("; ".join(fields.values()))
        self.fields = fields


class RefusedForm(FormError, PathRefused):
    """A form naming a path outside the allowed roots (the server answers 403, with the fields)."""


def field_errors(err: Exception, default: str) -> dict[str, str]:
    """{dotted key: message} from an error's lines: each line goes to the first config key it names, or to
    `default` (e.g. data.train for an error reading the data file)."""
    out: dict[str, str] = {}
    for line in str(err).splitlines() or [str(err)]:
        m = FIELD.search(line)
        key = m.group(1) if m else default
        out[key] = f"{out[key]}\n{line}" if key in out else line
    return out


def schema() -> dict:
    """What the form needs to draw itself: methods and the fields each reads, choices, defaults, docs."""
    sections = {}
    for section, cls in (("model", config_mod.ModelConfig), ("data", config_mod.DataConfig),
                         ("method", config_mod.MethodConfig), ("train", config_mod.TrainConfig),
                         ("preference", PreferenceConfig), ("grpo", GrpoConfig)):
        docs = config_mod.field_docs(cls)
        sections[section] = {k: {"default": v, "type": docs[k][0], "doc": docs[k][1]}
                             for k, v in dataclasses.asdict(cls()).items()}
    return {"sections": sections, "choices": config_mod.CHOICES, "method_fields": config_mod.METHOD_FIELDS,
            "objective_fields": OBJECTIVE_FIELDS, "data_hints": DATA_HINTS}


def build(tree: dict, roots: Roots) -> config_mod.Config:
    """The config of a form (a nested dict as YAML holds it), its paths checked against the roots; every
    problem at once, as FormError."""
    # a section that is not a mapping goes on as given: config.from_dict names it, as for a YAML file
    tree = {k: dict(v) if isinstance(v, dict) else v for k, v in tree.items()}
    fields: dict[str, str] = {}
    refused = False
    for key, check in (("model.path", roots.model), ("data.train", roots.check), ("data.eval", roots.check),
                       ("train.output_dir", roots.check)):
        section, name = key.split(".")
        value = tree[section].get(name) if isinstance(tree.get(section), dict) else None
        if value and isinstance(value, str):  # another type: from_dict says what it expected
            try:
                tree[section][name] = str(check(value, key))
            except SlimtuneError as err:
                fields[key], refused = str(err), refused or isinstance(err, PathRefused)
    try:
        cfg = config_mod.from_dict(tree, "setup")
    except config_mod.ConfigError as err:
        fields.update(field_errors(err, "config"))
        raise (RefusedForm if refused else FormError)(fields) from None
    if fields:
        raise (RefusedForm if refused else FormError)(fields)
    try:  # what `slimtune train` refuses before it loads anything, in its words
        pref_reference.resolve(cfg)
        preference_step.check(cfg, cfg.train.gpus)
    except config_mod.ConfigError as err:
        raise FormError(field_errors(err, "train.objective")) from None
    return cfg


def warnings(cfg: config_mod.Config) -> list[str]:
    """The warnings `slimtune train` prints for method.* keys that do nothing."""
    return config_mod.unused(cfg)


@functools.lru_cache(maxsize=4)
def tokenizer(path: str, trust_remote_code: bool = False):
    """Tokenizers are slow to load and every keystroke asks again: the last few stay loaded."""
    return models.load_tokenizer(path, trust_remote_code)


def _guard(default: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except (SlimtuneError, OSError) as err:  # OSError: a file a library opened, as the CLI reports it
        raise FormError(field_errors(err, default)) from None


def preview(cfg: config_mod.Config, n: int = 3) -> dict:
    """The first n records as `slimtune inspect` shows them (prompt and trained parts apart, token counts) and
    the counts over the first PREVIEW_RECORDS records (truncated, lost EOS or answer); preference records as
    prompt, chosen and rejected (pairs_preview)."""
    if not cfg.data.train:
        raise FormError({"data.train": "data.train: empty; give a data file (alpaca or messages JSONL)"})
    if cfg.train.objective != "sft":
        return pairs_preview(cfg, n)
    examples = _guard("data.train", read, cfg.data.train, cfg.data.format, PREVIEW_RECORDS)
    tok = _guard("model.path", tokenizer, cfg.model.path, cfg.model.trust_remote_code)
    encoded, stats = _guard("data.train", encode_examples, examples, tok, cfg.data)
    records = []
    for enc in encoded[:n]:
        trained = sum(1 for x in enc.labels if x != -100)
        parts = [{"trained": t, "text": tok.decode(ids, skip_special_tokens=False)}
                 for t, ids in segments(enc.input_ids, enc.labels)]
        records.append({"where": enc.where, "tokens": len(enc.input_ids), "prompt": len(enc.input_ids) - trained,
                        "trained": trained, "truncated": enc.truncated, "parts": parts})
    return {"records": records, "read": len(examples), "limit": PREVIEW_RECORDS,
            "summary": stats.summary("preview", cfg.data.max_len),
            "stats": {"records": stats.records, "tokens": stats.tokens, "trained_tokens": stats.trained_tokens,
                      "truncated": stats.truncated, "lost_eos": stats.lost_eos, "lost_answer": stats.lost_answer}}


def pairs_preview(cfg: config_mod.Config, n: int = 3) -> dict:
    """The first n preference records as `slimtune inspect --objective` shows them: the prompt (masked), the
    chosen and the rejected answer (kto: the completion and its label), and the totals line."""
    objective = cfg.train.objective
    kind, recs = _guard("data.train", pref_read.read, cfg.data.train, cfg.data.format, PREVIEW_RECORDS)
    recs = _guard("data.train", for_objective, kind, recs, objective, cfg.data.train)
    tok = _guard("model.path", tokenizer, cfg.model.path, cfg.model.trust_remote_code)
    pairs, stats = _guard("data.train", encode_records, recs, tok, cfg.data)
    records = []
    for p in pairs[:n]:
        answers = [("chosen", p.chosen), ("rejected", p.rejected)] if p.paired else \
            [("desirable" if p.label else "undesirable", p.chosen)]
        parts = [{"trained": False, "kind": "prompt", "text": tok.decode(p.prompt, skip_special_tokens=False)}]
        parts += [{"trained": True, "kind": k, "text": tok.decode(ids, skip_special_tokens=False)}
                  for k, ids in answers]
        records.append({"where": p.where, "tokens": len(p.prompt) + len(p.chosen) + len(p.rejected),
                        "prompt": len(p.prompt), "trained": len(p.chosen) + len(p.rejected),
                        "truncated": p.truncated, "parts": parts})
    return {"records": records, "read": len(recs), "limit": PREVIEW_RECORDS, "pairs": True,
            "summary": summary(stats, "preview", cfg.data.max_len),
            "stats": {"records": stats.records, "tokens": stats.tokens, "truncated": stats.truncated,
                      "identical": stats.identical, "empty": stats.empty}}


def _records(cfg: config_mod.Config, tok: Any) -> preflight.Records:
    """The training records as `slimtune train` reads them for train.objective (pairs, unpaired records, prompts)."""
    return preflight.records(cfg, tok, lambda *a: None, preflight.answers_needed(cfg.grpo))


PARTS = ("weights", "trainable", "gradients", "optimizer", "activations", "logits", "optimizer_step_extra",
         "gathered", "allocator")


def estimate(cfg: config_mod.Config, budget: str = "") -> dict:
    """`slimtune estimate CONFIG [--budget B]` as data: the same parts, table, faster setting and the changes
    that fit; plus `slimtune params`' counts."""
    size = _guard("budget", memory.parse_size, budget) if budget else None
    if cfg.train.objective == "grpo":  # as train: a micro-batch of one prompt's G completions unless set
        cfg = grpo_step.one_prompt_per_micro_batch(cfg, lambda *a: None, cfg.train.gpus)
        if cfg.train.gpus > 1:
            _guard("train.micro_batch_size", grpo_step.check_processes, cfg, cfg.train.gpus)
    built = None
    if cfg.data.train:
        tok = _guard("model.path", tokenizer, cfg.model.path, cfg.model.trust_remote_code)
        built = _guard("data.train", _records, cfg, tok)
    sizes = preflight.sizes(built) if built else None
    plan = _guard("model.path", run_plan.for_estimate, cfg, size, sizes, cfg.train.gpus)  # as `slimtune estimate`
    auto, cfg = split.is_auto(cfg.train), plan.apply(cfg)
    if cfg.train.objective == "grpo":
        return _grpo_estimate(cfg, plan, built, size)
    rows = sizes[:cfg.train.micro_batch_size] if sizes else None
    est = _guard("model.path", preflight.predict, cfg, plan, sizes)
    trainable, total = _guard("method.name", count_on_meta, cfg.model.path, cfg.method, cfg.model.trust_remote_code)
    out = {"parts": {k: getattr(est, k) / memory.GIB for k in PARTS}, "peak_gib": est.peak / memory.GIB,
           "cuda_context_gib": est.cuda_context / memory.GIB, "notes": est.notes, "table": est.table(),
           "trainable": trainable, "total": total, "faster": None, "budget_gib": None, "fits": None, "fixes": [],
           "plan": plan.describe()}
    quick = memory.faster(cfg, rows, plan.kernels, plan.precision) if cfg.train.gpus <= 1 and not auto else None
    if quick and (size is None or quick[1] <= size):
        out["faster"] = {"change": quick[0], "gib": quick[1] / memory.GIB}
    if size is not None:
        total_bytes = est.peak + est.cuda_context
        out.update(budget_gib=size / memory.GIB, fits=total_bytes <= size, verdict=memory.verdict_line(est, size))
        if total_bytes > size:
            fixes = memory.suggestions(cfg, size, rows, plan.kernels)
            out["fixes"] = [{"change": t, "gib": p / memory.GIB} for t, p in sorted(fixes, key=lambda x: -x[1])]
    return out


def _grpo_estimate(cfg: config_mod.Config, plan: run_plan.RunPlan, built: preflight.Records | None,
                   size: float | None) -> dict:
    """`slimtune estimate` of a grpo config as data: the line the run logs when it starts and its parts."""
    prompts = built.train if built else preflight.worst_prompt(cfg)
    model = _guard("model.path", preflight.meta_model, cfg, plan)
    est, line = preflight.grpo_predict(model, plan, prompts, cfg)
    trainable, total = _guard("method.name", count_on_meta, cfg.model.path, cfg.method, cfg.model.trust_remote_code)
    out = {"parts": {k: est[k] / memory.GIB for k in ("weights", "optimizer", "kv_cache", "train_pass")},
           "peak_gib": est["peak"] / memory.GIB, "cuda_context_gib": memory.CUDA_CONTEXT / memory.GIB, "notes": [],
           "table": line, "trainable": trainable, "total": total, "faster": None, "budget_gib": None, "fits": None,
           "fixes": [], "plan": plan.describe()}
    if size is not None:
        fits, verdict = preflight.grpo_verdict(est, size)
        out.update(budget_gib=size / memory.GIB, fits=fits, verdict=verdict)
    return out


def yaml_text(cfg: config_mod.Config) -> str:
    """The config as `slimtune train --print-config` prints it: what a user takes to the command line."""
    return config_mod.dump(cfg)
