"""Merge a run into a plain transformers model folder: base + adapter (or our trained parts), in fp32.

The folder loads with `AutoModelForCausalLM.from_pretrained(DIR)`, no slimtune and no peft: weights
in safetensors, config, tokenizer with the training chat template in tokenizer_config.json (a Jinja
equivalent of our family template when data.template is not auto), and generation_config.json whose
eos_token_id lists the template's stop tokens, so plain `generate` stops where ours does.

The merge checks itself on a few training prompts: logits of the merged model against the adapter
model, once in fp32 right after merging (a wrong merge shows here) and once after saving and loading
the folder back in the chosen dtype (a bad save or a dtype that overflows shows here).
"""
from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data import with_system
from ..data.collate import pad_id
from ..data.readers import read
from ..data.templates import FAMILIES, render, stop_ids
from ..errors import ExistingFileError, SlimtuneError
from ..methods.base import MethodError, is_peft
from .. import outputs
from ..models import DTYPES
from ..runs.adapter import read_config
from ..trained import load_run

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from ..config import Config

PROBE = ["Who are you?", "The capital of France is", "Give three tips for staying healthy."]
N_PROMPTS, PROMPT_LEN = 4, 128

# Max |logit difference| allowed, as a fraction of the largest |logit| on the probe prompts: logits
# scale with the model (SmolLM2-135M's reach 38 on its training prompts), and so does the rounding
# error of every sum leading to them, so no single absolute bound fits every model.
# fp32: merging rounds W + s*B@A once per weight (2^-24 relative) and re-orders the sums. Measured on
#   SmolLM2-135M after 4 LoRA steps: 9.7e-5 absolute = 2.5e-6 of the scale (ASSETS.md: 1.1e-4 over
#   all positions), so a flat 1e-4 would fail on it at random. Tiny random models (tests/evaluate):
#   2.1e-6 to 3.0e-6 = 6e-7 to 9e-7 of the scale for lora/dora/rslora/pissa/ia3, 0 for full/freeze/bitfit;
#   the adapter model's own fp32 forward differs from fp64 as much, so this is fp32 arithmetic, not the
#   merge. 2e-5 of the scale (7.7e-4 on SmolLM2) leaves 8x margin, while the adapter itself moves
#   those logits by 7.4 (0.19 of the scale): a merge that drops or mis-scales it is far outside.
# bf16 / fp16: the saved weights carry 8 / 11 mantissa bits and CPU matmuls round in them. Measured on
#   SmolLM2-135M: merged bf16 1.31 (3.4e-2 of the scale), fp16 0.13 (3.4e-3); the base model alone cast
#   from fp32 moves as much (1.50, 0.20). 0.1 and 0.02 leave 3-6x margin over that and still catch
#   what breaks a model (fp16 overflow to inf or nan, swapped or missing weights).
TOLERANCE = {"fp32": 2e-5, "bf16": 0.1, "fp16": 0.02}


class MergeError(SlimtuneError, ValueError):
    """The merged model differs from the trained one by more than the dtype's rounding allows."""


def _load_fp32(folder: Path, trust_remote_code: bool = False):
    """(trained model, tokenizer, config), base in fp32 on the CPU whatever the run trained in: a qlora
    run's base is loaded unquantized, and bf16 runs are merged at full precision before any cast."""
    return load_run(folder, "cpu", quantized=False, dtype="fp32", trust_remote_code=trust_remote_code)


def probe_texts(cfg: Config, tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], str]:
    """Up to 4 training records rendered as in training (prompt and answer), when data.train is still
    readable; else a few built-in prompts. Returns (texts, where they came from)."""
    try:
        examples = read(cfg.data.train, cfg.data.format, N_PROMPTS)
        convs = [with_system(ex, cfg.data.system) for ex in examples]
        texts = [render(cfg.data.template, c, tokenizer).text for c in convs]
        return texts, f"{len(convs)} records of {cfg.data.train}"
    except Exception:  # moved, deleted, or written on another machine: the built-in prompts do as well
        convs = [[{"role": "user", "content": q}] for q in PROBE]
        return [render(cfg.data.template, c, tokenizer, add_generation_prompt=True).text for c in convs], \
            f"{len(PROBE)} built-in prompts"


def probe_batch(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:PROMPT_LEN] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def real_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """fp32 logits at the non-padding positions, (tokens, vocab)."""
    return model(**batch).logits.float()[batch["attention_mask"].bool()]


def _literal(text: str) -> str:
    # Jinja reads string literals with Python's escapes; non-ASCII passes through as itself
    return json.dumps(text, ensure_ascii=False)


def _expr(fmt: str, tok: dict, **variables: str) -> str:
    """A family format string ("<|user|>{content}") as a Jinja expression joining literals and variables."""
    marks = {name: f"\x00{name}\x00" for name in variables}
    text = fmt.format(**tok, **{k: marks.get(k, "") for k in ("content", "system")})
    parts = []
    for i, piece in enumerate(text.split("\x00")):
        if i % 2:
            parts.append(variables[piece])
        elif piece:
            parts.append(_literal(piece))
    return " + ".join(parts) or "''"


PLAIN_ANSWER = "{%- set c = m['content'] -%}"
THINK_HEAD, THINK_TAIL = "<think>\n", "\n</think>\n\n"


def _think_jinja() -> str:
    """Jinja setting `c` to an answer as Qwen3's thinking template writes it (data.families.think_turns)."""
    nl = _literal("\n")
    return (
        "{%- set c = m['content'] -%}{%- if loop.index0 > ns.last -%}"
        "{%- if '</think>' in c -%}"
        f"{{%- set r = c.split('</think>')[0].rstrip({nl}).split('<think>')[-1].lstrip({nl}) -%}}"
        "{%- set c = c.split('</think>')[-1] -%}{%- else -%}{%- set r = '' -%}{%- endif -%}"
        f"{{%- set c = {_literal(THINK_HEAD)} + r.strip({nl}) + {_literal(THINK_TAIL)} + c.lstrip({nl}) -%}}"
        f"{{%- elif '</think>' in c -%}}{{%- set c = c.split('</think>')[-1].lstrip({nl}) -%}}{{%- endif -%}}"
    )


def jinja_template(name: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """A chat_template that renders a family template as `data.templates.render` does: the same text
    for generation prompts and for earlier turns (after the final answer it also writes the family's
    after-answer text, e.g. ChatML's newline, which training drops)."""
    fam = FAMILIES[name]
    tok = {"bos": tokenizer.bos_token or "", "eos": tokenizer.eos_token or ""}
    system = _expr(fam.system, tok, content="system")
    sys_part = f"({system} if system else '')"
    first = _expr(fam.user_first, tok, content="m['content']", system=sys_part)
    following = _expr(fam.user_next, tok, content="m['content']")
    answer = _expr(fam.answer_end + fam.after_answer, tok)
    own_system = "" if fam.system_inside_user else f"{{%- if system -%}}{{{{- {system} -}}}}{{%- endif -%}}"
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        "{%- else -%}{%- set system = '' -%}{%- set turns = messages -%}{%- endif -%}"
        f"{{{{- {_literal(fam.prefix.format(**tok))} -}}}}{own_system}"
        "{%- set ns = namespace(first=true, last=-1) -%}"
        "{%- for m in turns -%}{%- if m['role'] == 'user' -%}{%- set ns.last = loop.index0 -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- for m in turns -%}{%- if m['role'] == 'user' -%}"
        f"{{%- if ns.first -%}}{{%- set head = {first} -%}}"
        f"{{%- else -%}}{{%- set head = {following} -%}}{{%- endif -%}}"
        # the generation prompt stops before the header's final space: training joins it to the answer
        "{%- if loop.last and add_generation_prompt -%}{{- head.rstrip(' ') -}}{%- else -%}{{- head -}}{%- endif -%}"
        "{%- set ns.first = false -%}"
        f"{{%- else -%}}{_think_jinja() if fam.think else PLAIN_ANSWER}{{{{- c + {answer} -}}}}{{%- endif -%}}"
        "{%- endfor -%}"
    )


def _drop_custom_code(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    """Without --trust-remote-code the model ran on transformers' own classes: the merged folder names no
    custom code (an auto_map left in would point at .py files that are not copied)."""
    model.config.__dict__.pop("auto_map", None)
    tokenizer.init_kwargs.pop("auto_map", None)


def _write(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: Config, out: Path, dtype: str,
           trust_remote_code: bool = False) -> None:
    if not trust_remote_code:
        _drop_custom_code(model, tokenizer)
    model.to(DTYPES[dtype])
    gen_cfg = model.generation_config
    stops = stop_ids(cfg.data.template, tokenizer)
    if stops:
        gen_cfg.eos_token_id = stops if len(stops) > 1 else stops[0]
    gen_cfg.pad_token_id = pad_id(tokenizer)
    model.save_pretrained(out)
    if cfg.data.template != "auto":
        tokenizer.chat_template = jinja_template(cfg.data.template, tokenizer)
    # in tokenizer_config.json (not chat_template.jinja): older transformers and other tools read it there
    tokenizer.save_pretrained(out, save_jinja_files=False)


def _check(diff: float, scale: float, dtype: str, what: str) -> None:
    limit = TOLERANCE[dtype] * max(scale, 1.0)
    if not diff <= limit:  # also catches nan
        raise MergeError(f"{what}: max |logit diff| {diff:.3g} exceeds the {dtype} tolerance {limit:.3g} "
                         f"({TOLERANCE[dtype]:g} x the largest |logit| {scale:.3g}); the merged model does not "
                         "reproduce the trained one" + (": try --dtype bf16 or fp32" if dtype == "fp16" else ""))


def _check_output(folder: Path, out: Path, cfg: Config, overwrite: bool) -> None:
    """Refuse, before anything loads, an --output that would overwrite or mix with what the merge reads
    (a base model overwritten by its own merge makes every later load of the run apply the adapter twice),
    or a folder holding something other than a merged model."""
    run = folder.parent.parent if folder.parent.name == "checkpoints" else folder  # a checkpoint's run
    where = out.resolve()
    # --overwrite replaces the folder whole: it must not hold the data its probe prompts come from either
    outputs.check(out, "merge --output", cfg.model.path,
                  reads=[("the run folder", run), ("the training data", cfg.data.train)])
    if out.exists() and not out.is_dir():
        raise ExistingFileError(f"merge --output {out} is a file; give a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if (out / "config.yaml").exists() or (out / "adapter_config.json").exists():
        raise ExistingFileError(f"{out} holds a training run; give merge another --output folder")
    if not overwrite:
        raise ExistingFileError(f"merge --output {out} is not empty; pass --overwrite to replace the model there, or "
                                "give another folder")
    if not (out / "config.json").is_file() or where == Path.cwd().resolve() or where in Path.cwd().resolve().parents:
        raise ExistingFileError(f"merge --output {out} holds files but no merged model (config.json); --overwrite "
                                "replaces only a model folder: give another folder")


def _replace(tmp: Path, out: Path) -> None:
    """Put the checked folder in place: the old model is renamed aside first and deleted only after, so
    a kill leaves the old model or the new one (or the old one beside it, as .NAME.old-PID), never half
    of each."""
    out = out.resolve()
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    for kind in ("tmp", "old"):  # this merge's, and those of merges killed here
        for left in out.parent.glob(f".{out.name}.{kind}-*"):
            shutil.rmtree(left, ignore_errors=True)


def merge(folder: str | Path, output: str | Path, dtype: str = "fp32", log: Callable[[str], None] = print,
          overwrite: bool = False, trust_remote_code: bool = False) -> dict:
    """Write the merged model folder; returns the measured differences (max |logit diff| vs the
    adapter model: `merge_diff` in fp32 right after merging, `saved_diff` of the folder loaded back).
    overwrite: replace a merged model already in `output` (written beside it, then renamed into place).
    trust_remote_code: the user's own flag; only with it does the model folder's own Python run, and
    only then is it copied into the output."""
    from transformers import AutoModelForCausalLM

    folder, out = Path(folder), Path(output)
    _check_output(folder, out, read_config(folder), overwrite)
    model, tokenizer, cfg = _load_fp32(folder, trust_remote_code)
    if is_peft(model) and model.active_peft_config.is_prompt_learning:
        raise MethodError(f"method {cfg.method.name} adds virtual tokens at run time; there are no weights "
                          "to merge into the base: load the adapter with peft instead")
    texts, where = probe_texts(cfg, tokenizer)
    batch = probe_batch(texts, tokenizer)
    before = real_logits(model, batch)
    scale = float(before.abs().max())
    if is_peft(model):
        model = model.merge_and_unload(safe_merge=True)  # safe_merge: refuses weights that turn nan/inf
    merge_diff = float((real_logits(model, batch) - before).abs().max())
    log(f"merge check on {where}: merged vs adapter model max |logit diff| = {merge_diff:.2e} in fp32 "
        f"(largest |logit| {scale:.1f}, tolerance {TOLERANCE['fp32'] * max(scale, 1):.1e})")
    _check(merge_diff, scale, "fp32", "merge")
    tmp = out.resolve().with_name(f".{out.resolve().name}.tmp-{os.getpid()}")  # beside it: a rename, one disk
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(model, tokenizer, cfg, tmp, dtype, trust_remote_code)
        del model
        gc.collect()
        # trust_remote_code said outright: left unset, transformers asks [y/N] on a folder with custom code
        saved = AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[dtype],
                                                     trust_remote_code=trust_remote_code).eval()
        saved_diff = float((real_logits(saved, batch) - before).abs().max())
        del saved
        _check(saved_diff, scale, dtype, f"{out} loaded in {dtype}")
        _replace(tmp, out)  # only a folder that passed its check replaces what --output held
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"saved {out} ({cfg.method.name}, {dtype}) loaded back: max |logit diff| = {saved_diff:.2e} vs the "
        f"fp32 adapter model (tolerance {TOLERANCE[dtype] * max(scale, 1):.1e})")
    return {"merge_diff": merge_diff, "saved_diff": saved_diff, "logit_scale": scale, "dtype": dtype}
