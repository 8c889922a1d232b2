"""GRPO step time on one GPU: slimtune beside TRL's GRPOTrainer + peft, each recipe in its own process.

The workload, the same for both: a random-init model of seed_recipe's shapes (1b: Llama-3.2-1B; the weights'
values do not change the work), LoRA r=16 / alpha 16 / dropout 0 on the seven projections, bf16 on a GPU,
P prompts a step (--prompts, default 8) x G completions each (--generations, default 8: 64 completions a step)
of --new-tokens (default 256) tokens, sampled at temperature 1.0 (top_k 0, top_p 1), beta 0 (both tools' default:
no reference pass), one optimizer step per generation, lr 1e-5, the same Python reward (a regex count) passed
through each tool's API. Prompts: synthetic token ids, 15..120 tokens each, seed 0, spelled as words of a
word-level tokenizer ("t17 t4242 ..."), so both tools tokenize them to the same ids; exactly --prompts x
(warm-up + timed steps) of them, so a run is one pass over them. The tokenizer's EOS id is one past the model's
vocabulary: it is never sampled, so every completion runs to --new-tokens in both tools and the work is equal.

  slimtune  slimtune.prepare + slimtune.fit (train.objective=grpo), --micro prompts per micro-batch (default all
            P: one sampling call and one training pass of P x G rows a step), every other key at its default
  trl       trl.GRPOTrainer with peft_config=LoraConfig, per_device_train_batch_size = --micro x G completions,
            gradient_accumulation_steps = P / --micro (TRL samples the whole step at once), TRL's defaults
            otherwise (gradient checkpointing on, bf16, use_vllm False: transformers' generate), no eval, no saving

Per step: wall time (synced), generation time (slimtune: fit's metrics.jsonl gen_s, the sampling, decoding and
scoring of the step; TRL: its _generate_and_score_completions, timed with a sync on each side), training time
(slimtune: train_s; TRL: step - generation), tokens = prompt + completion tokens of every completion (padding
excluded; slimtune: fit's count of seen tokens, TRL: the prompt and completion masks of its batch). tok_s =
tokens of the timed steps / their summed step time, the same formula for both. peak_gib: the process's peak
allocated GPU memory. 2 warm-up steps (the first holds slimtune's torch.compile), then 20 timed steps (--steps);
with --limit each recipe's process stops training 30 s before its limit and reports the steps it timed, so a
slow recipe gives fewer (the row's `steps`; --compare flags under 10).

  python bench/grpo_speed.py --size 1b --recipes slimtune,trl --out /tmp/out/grpo.jsonl
  python bench/grpo_speed.py --smoke            # both recipes on the CPU in seconds (tiny shape, G=2, 8 tokens)
  python bench/grpo_speed.py --recipes slimtune --key train.compile=off   # a slimtune config override
  python bench/grpo_speed.py --compare FILE     # each slimtune row's tok/s over the trl row's

trl is not a slimtune dependency: bench/gpu.sh installs the carried wheels (trl, datasets, dill, multiprocess).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STARTED = time.perf_counter()
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOKE = ["--size", "tiny", "--vocab", "1024", "--generations", "2", "--new-tokens", "8", "--prompts", "2",
         "--steps", "2", "--warmup", "1"]

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """n synthetic prompts: 15..120 token ids each, from ids 10..120000 (clear of the special ones)."""
    rng = random.Random(seed)
    return [[rng.randint(10, min(120000, vocab - 1)) for _ in range(rng.randint(15, 120))] for _ in range(n)]


def as_text(ids: list[int]) -> str:
    return " ".join(f"t{i}" for i in ids)


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of the model's vocabulary: id 0 [PAD], 1 [UNK], i "t<i>", and [EOS] at id `vocab`,
    one past the model's last logit, so no completion ever ends early."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"[PAD]": 0, "[UNK]": 1, **{f"t{i}": i for i in range(2, vocab)}, "[EOS]": vocab}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def sevens(prompts: list, completions: list, answers: list | None = None, **_: Any) -> list[float]:
    """The reward both tools get: the share of completion words whose id ends in 7 (cheap, varies per sample)."""
    return [len(re.findall(r"\bt\d*7\b", c)) / max(len(c.split()), 1) for c in completions]


def build_model(size: str, dev: str, vocab: int = 0) -> torch.nn.Module:
    """seed_recipe's random-init model of this size (a vocabulary of `vocab` tokens where given), seed 0, bf16 on a
    GPU (fp32 on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(HERE / "peers"))
    from seed_recipe import model_config
    torch.manual_seed(0)
    mcfg = model_config(size, max_position_embeddings=4096)
    mcfg.vocab_size = vocab or mcfg.vocab_size
    if dev == "cpu":
        torch.set_num_threads(1)  # the smoke run: tiny matrices, where a second thread on a busy CPU costs 10x
    with torch.device(dev):
        return AutoModelForCausalLM.from_config(mcfg,
                                                attn_implementation="sdpa",
                                                dtype=torch.bfloat16 if dev == "cuda" else torch.float32)


def summary(tool: str, a: argparse.Namespace, steps: list[dict], dev: str, extra: dict) -> dict:
    """The JSON row of one recipe from its per-step numbers (step_s, gen_s, train_s, tokens), warm-up dropped."""
    import torch

    timed = steps[a.warmup:]
    total = sum(s["step_s"] for s in timed)
    per = [s["step_s"] for s in timed] or [0.0]
    if not timed:
        extra = dict(extra, error=f"no timed step within --budget {a.budget:g} s ({len(steps)} warm-up steps done)")
    return dict(bench="grpo", tool=tool, size=a.size, recipe=recipe_name(tool, a), prompts=a.prompts,
                generations=a.generations, new_tokens=a.new_tokens, micro=a.micro or a.prompts,
                tok_s=round(sum(s["tokens"] for s in timed) / total, 1) if total else 0.0,
                gen_s=round(statistics.mean([s["gen_s"] for s in timed] or [0.0]), 4),
                train_s=round(statistics.mean([s["train_s"] for s in timed] or [0.0]), 4),
                step_mean_s=round(total / max(len(timed), 1), 4), step_median_s=round(statistics.median(per), 4),
                step_max_s=round(max(per), 4), steps=len(timed), warmup=a.warmup,
                tokens=sum(s["tokens"] for s in timed), step_tokens=[s["tokens"] for s in steps],
                step_s=[round(s["step_s"], 4) for s in steps], step_gen_s=[round(s["gen_s"], 4) for s in steps],
                step_train_s=[round(s["train_s"], 4) for s in steps],
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else 0.0,
                device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                date=str(datetime.date.today()), versions=versions(), **extra)


def recipe_name(tool: str, a: argparse.Namespace) -> str:
    micro = a.micro or a.prompts
    return (f"{tool} grpo lora r16 all-linear, {a.prompts} prompts x G={a.generations}, {a.new_tokens} new tokens, "
            f"{micro * a.generations} completions a micro-batch")


def slimtune_worker(a: argparse.Namespace) -> dict:
    """slimtune.prepare + slimtune.fit with train.objective=grpo; per step from fit's metrics.jsonl."""
    import torch
    import yaml

    sys.path.insert(0, str(ROOT))
    import slimtune
    from slimtune.data.prompts import PromptRecord
    from slimtune.runs.metrics_log import read_metrics

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    micro = a.micro or a.prompts
    out = Path(tempfile.mkdtemp(prefix="grpo-speed-"))
    (out / "base.yaml").write_text(yaml.safe_dump({
        "method": {"name": "lora", "r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ALL_LINEAR},
        "train": {"output_dir": str(out / "run"), "objective": "grpo"}, "grpo": {"rewards": []}}))
    total = a.warmup + a.steps
    keys = {"train.micro_batch_size": micro, "train.grad_accum": a.prompts // micro, "train.max_steps": total,
            "train.lr": 1e-5, "train.seed": 0, "train.save_every": 0, "train.log_every": 1,
            "train.eval_at_start": "false", "grpo.num_generations": a.generations,
            "grpo.max_new_tokens": a.new_tokens, "grpo.temperature": 1.0}
    cfg = slimtune.load_config(out / "base.yaml", [f"{k}={v}" for k, v in keys.items()] + a.key)
    model = build_model(a.size, dev, a.vocab)
    tok = word_tokenizer(model.config.vocab_size)
    records = [PromptRecord(tok(as_text(ids))["input_ids"], as_text(ids), None, f"synthetic {i}")
               for i, ids in enumerate(prompt_ids(a.prompts * total, model.config.vocab_size))]
    say = lambda text: print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)  # noqa: E731
    model = slimtune.prepare(model, cfg, dev, log=say).model
    # past the budget, SIGINT: fit's own stop (the step in flight ends, a checkpoint is saved, fit returns)
    stop = threading.Timer(max(a.budget - (time.perf_counter() - STARTED), 0.1),
                           lambda: os.kill(os.getpid(), signal.SIGINT))
    if a.budget:
        stop.start()
    try:
        slimtune.fit(model, records, cfg, device=dev, log=say, rewards=[sevens], tokenizer=tok,
                     pad_id=tok.pad_token_id)
    finally:
        stop.cancel()
    rows = [r for r in read_metrics(out / "run" / "metrics.jsonl") if "gen_s" in r]
    seen = [0] + [round(r["input_tokens_per_s"] * r["elapsed_s"]) for r in rows]  # fit's running token count
    steps = [dict(step_s=r["step_s"], gen_s=r["gen_s"], train_s=r["train_s"], tokens=seen[i + 1] - seen[i])
             for i, r in enumerate(rows)]
    return summary("slimtune", a, steps, dev, {"completion_length": rows[-1]["completion_length"] if rows else 0,
                                               "keys": a.key})


def trl_worker(a: argparse.Namespace) -> dict:
    """trl.GRPOTrainer + peft LoraConfig; per step from a callback (synced) and a timer around its generation."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    micro = a.micro or a.prompts
    total = a.warmup + a.steps
    model = build_model(a.size, dev, a.vocab)
    tok = word_tokenizer(model.config.vocab_size)
    data = Dataset.from_dict({"prompt": [as_text(ids) for ids in prompt_ids(a.prompts * total,
                                                                            model.config.vocab_size)]})
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="grpo-speed-trl-"), per_device_train_batch_size=micro *
                      a.generations, gradient_accumulation_steps=a.prompts // micro, num_generations=a.generations,
                      max_completion_length=a.new_tokens, temperature=1.0, max_steps=total, learning_rate=1e-5,
                      seed=0, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
                      use_vllm=False, bf16=dev == "cuda", use_cpu=dev == "cpu", dataloader_num_workers=0)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args: Any, **kw: Any) -> None:
            sync()
            if not steps or "step_s" in steps[-1]:  # once per optimizer step, whatever the accumulation
                steps.append(dict(began=time.perf_counter(), gen_s=0.0, tokens=0))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
            sync()
            s = steps[-1]
            s["step_s"] = time.perf_counter() - s.pop("began")
            s["train_s"] = s["step_s"] - s["gen_s"]
            control.should_training_stop |= bool(a.budget) and time.perf_counter() - STARTED > a.budget
            return control

    import trl.trainer.utils as trl_utils
    if trl_utils._ChunkedLogProbFunction is None:  # no Triton (the CPU smoke run): the same numbers in plain torch
        trl_utils._ChunkedLogProbFunction = PlainLogProbs
    trainer = GRPOTrainer(model=model, reward_funcs=[sevens], args=args, train_dataset=data, processing_class=tok,
                          peft_config=lora, callbacks=[Clock()])
    trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, steps, sync)
    trainer.train()
    return summary("trl", a, steps, dev, {"completion_length": steps[-1].get("completion_length", 0) if steps else 0})


class PlainLogProbs:
    """TRL's chunked log-prob kernel in plain PyTorch, for machines without Triton (the --smoke run on a CPU):
    log-probabilities of the targets (and the entropy when asked), the rest None."""

    @staticmethod
    def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
              temperature: float, chunk: int, softcap: float | None = None, scale: float = 1.0,
              outputs: tuple[str, ...] = ()) -> tuple:
        import torch

        logits = torch.nn.functional.linear(hidden, weight, bias).float() * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        logps = torch.log_softmax(logits / temperature, dim=-1)
        entropy = -(logps.exp() * logps).sum(-1) if "entropy" in outputs else None
        return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy, None, None, None


def timed(generate: Callable, steps: list[dict], sync: Callable[[], None]) -> Callable:
    """TRL's generate-and-score, its seconds and its batch's prompt + completion tokens added to the step's."""
    def run(*args: Any, **kw: Any) -> dict:
        sync()
        began = time.perf_counter()
        out = generate(*args, **kw)
        sync()
        steps[-1]["gen_s"] += time.perf_counter() - began
        steps[-1]["tokens"] += int(out["prompt_mask"].sum()) + int(out["completion_mask"].sum())
        steps[-1]["completion_length"] = float(out["completion_mask"].sum(dim=1).double().mean())
        return out
    return run


def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for p in ("torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def run_recipe(tool: str, argv: list[str], limit: float) -> dict:
    """One recipe in its own process, its output passed on as it comes, killed at `limit` seconds (its worker
    stops training 30 s before): its JSON row, or a row with the error."""
    began = time.perf_counter()
    budget = ["--budget", str(max(limit - 30, 0.8 * limit))] if limit else []
    proc = subprocess.Popen([sys.executable, str(Path(__file__)), "--worker", tool, *argv, *budget], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    kill = threading.Timer(limit, proc.kill)
    if limit:
        kill.start()
    found, tail = [], []
    for line in proc.stdout:
        if line.startswith("RESULT {"):
            found.append(json.loads(line[len("RESULT "):]))
            continue
        print(f"  {tool}| {line}", end="", file=sys.stderr, flush=True)
        tail = (tail + [line.strip()])[-20:] if line.strip() else tail
    rc = proc.wait()
    kill.cancel()
    took = time.perf_counter() - began
    print(f"{tool}: rc {rc}, {took:.0f} s", file=sys.stderr, flush=True)
    if found:
        return dict(found[-1], wall_s=round(took, 1))
    why = f"killed at its {limit:g} s limit" if limit and took >= limit else (tail[-1][:300] if tail else f"rc {rc}")
    return dict(bench="grpo", tool=tool, tok_s=0.0, error=why, rc=rc, date=str(datetime.date.today()),
                wall_s=round(took, 1))


def compare(rows: list[dict]) -> list[str]:
    """slimtune's tok/s over trl's, per size, from the newest row of each."""
    lines = []
    newest = {(r.get("tool"), r.get("size")): r for r in rows if r.get("bench") == "grpo"}
    for (tool, size), ours in newest.items():
        peer = newest.get(("trl", size))
        if tool != "slimtune" or not peer or not peer.get("tok_s") or not ours.get("tok_s"):
            continue
        lines.append(f"{size}: slimtune {ours['tok_s']:,.0f} tok/s (step {ours['step_median_s']:.2f} s: gen "
                     f"{ours['gen_s']:.2f} + train {ours['train_s']:.2f}, peak {ours['peak_gib']} GiB) / trl "
                     f"{peer['tok_s']:,.0f} tok/s (step {peer['step_median_s']:.2f} s: gen {peer['gen_s']:.2f} + "
                     f"train {peer['train_s']:.2f}, peak {peer['peak_gib']} GiB) = "
                     f"{ours['tok_s'] / peer['tok_s']:.2f}x over {ours['steps']} and {peer['steps']} timed steps"
                     + (" (under 10 timed steps: a rough figure)" if min(ours["steps"], peer["steps"]) < 10 else ""))
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", choices=["slimtune", "trl"], help="run this recipe in this process")
    ap.add_argument("--recipes", default="slimtune,trl")
    ap.add_argument("--size", default="1b")
    ap.add_argument("--vocab", type=int, default=0, help="the model's vocabulary (0: the shape's)")
    ap.add_argument("--prompts", type=int, default=8, help="prompts a step")
    ap.add_argument("--micro", type=int, default=0, help="prompts a micro-batch (0: all of the step's)")
    ap.add_argument("--generations", type=int, default=8, help="completions a prompt (G)")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20, help="timed steps (fewer when --limit stops a recipe first)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--limit", type=float, default=0, help="seconds each recipe's process may run (0: no limit)")
    ap.add_argument("--budget", type=float, default=0, help="worker: seconds after its start past which it stops "
                    "training after the step in flight and reports the steps done (0: none)")
    ap.add_argument("--key", action="append", default=[], help="slimtune: a config override (train.compile=off)")
    ap.add_argument("--smoke", action="store_true", help="the CPU check: " + " ".join(SMOKE))
    ap.add_argument("--out", default="", help="append each recipe's JSON row to this file")
    ap.add_argument("--compare", default="", help="print slimtune / trl from the rows of this file")
    a = ap.parse_args(argv)
    if a.compare:
        print("\n".join(compare([json.loads(x) for x in open(a.compare) if x.startswith("{")])) or "no pair")
        return 0
    if a.smoke:
        a = ap.parse_args([*SMOKE, *(argv if argv is not None else sys.argv[1:])])  # what is given wins
    micro = a.micro or a.prompts
    if a.prompts % micro:
        ap.error(f"--prompts {a.prompts} is not a multiple of --micro {micro}")
    if a.worker:
        print("RESULT " + json.dumps(slimtune_worker(a) if a.worker == "slimtune" else trl_worker(a)), flush=True)
        return 0
    passed = [f"--{k}={v}" for k, v in (("size", a.size), ("vocab", a.vocab), ("prompts", a.prompts), ("micro", micro),
                                         ("generations", a.generations), ("new-tokens", a.new_tokens),
                                         ("steps", a.steps), ("warmup", a.warmup))]
    passed += [f"--key={k}" for k in a.key]
    rows = []
    for tool in a.recipes.split(","):
        row = run_recipe(tool, passed, a.limit)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.out:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    print("\n".join(compare(rows)), flush=True)
    return int(any(not r.get("tok_s") for r in rows))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
