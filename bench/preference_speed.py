"""DPO speed and memory on one GPU: slimtune beside TRL's DPOTrainer + peft, each recipe in its own process.

The workload: a random-init model of bench/speed.py's sizes (seed_recipe.model_config: 1b, 8b, qwen7b; a tiny
Llama for --smoke) saved once with a word-level tokenizer as unsloth_recipe.make_model's (word "t<i>" is token i,
so a text's tokens are known exactly) and a chat template that writes the messages' text alone and an EOS after
each answer; synthetic pairs drawn as seed_recipe.synthetic_examples draws a record (fixed seed): prompt 15..120
tokens, each of chosen and rejected a response of that record's length distribution (lognormal around 180
tokens, sigma 0.7, 8..2000), plus its EOS, each answer cut so that prompt + answer fits --max_len (no tool
truncates anything, so both train on the same tokens). The pairs are written once as TRL's {"prompt", "chosen",
"rejected"} strings (pairs.jsonl), exactly --pairs x (--steps + --warmup) of them: one pass over the file in
both tools.

Recipes:
  slimtune  slimtune.train (what `slimtune train` runs) on that folder and file: method lora r16 / alpha 16 /
            dropout 0 on the seven projections, train.objective=dpo, train.batch_size=--pairs, lr 1e-4; every
            other key at its default (precision, split, checkpointing, kernels, reference: the engine's
            choices). Step times and tokens from its metrics.jsonl. The estimator's prediction (peak reserved,
            without the CUDA context) as train computes it before the load and `slimtune estimate` prints it
            (engine/preflight.predict: engine/memory.estimate of the plan's longest records, a pair being two
            rows), and for the largest micro-batch the run trains on (predicted_run_gib; its stream's seeded
            order, replayed).
  trl       trl.DPOTrainer + peft LoraConfig(r=16, alpha 16, dropout 0, the seven projections), bf16, gradient
            checkpointing, per_device_train_batch_size --trl_bs x gradient_accumulation_steps --trl_ga (8 x 1),
            beta 0.1, sigmoid loss, the reference the adapter switched off (TRL's default with peft),
            max_length --max_len, lr 1e-4, no evaluation, no saving, report_to none. Step times from a callback
            (on_step_begin / on_step_end, each after torch.cuda.synchronize).

Tokens/s, both recipes: real (non-pad) tokens of prompt+chosen and prompt+rejected of the pairs the timed steps
trained on (slimtune: its metrics.jsonl's input tokens, pair_logps.input_tokens; trl: the attention masks of
the batches its training_step received), over the wall time from the end of the last warm-up step to the end of
the last step. Peak memory: torch.cuda.max_memory_allocated (and reserved) of the recipe's whole process.

  python bench/preference_speed.py --size 8b                       # make the model, then slimtune, then trl
  python bench/preference_speed.py --size 8b --recipes trl --trl_bs 4 --trl_ga 2
  python bench/preference_speed.py --smoke                         # tiny shape on the CPU, 2 steps, seconds
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
            "{% endfor %}")
GIB = 2 ** 30
KERNELS = ("precision", "chunked_loss", "fused_lora_layers", "fused_norm_mlp", "fused_rope", "tiled_mlp",
           "compiled_layers")  # of slimtune's summary.json
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512)  # seed_recipe's tiny with a small head: seconds on a CPU


def synthetic_pairs(n: int, max_len: int, vocab: int = 120001,
                    seed: int = 0) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids below `vocab` (no EOS: the tools add it): lengths as
    seed_recipe.synthetic_examples draws a record's, each answer cut so that prompt + answer + EOS fits max_len."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = min(rng.randint(15, 120), max_len // 2)  # max_len // 2 below 120 only in the smoke's short rows
        answers = [min(int(min(max(8, rng.lognormvariate(math.log(180), 0.7)), 2000)), max_len - p - 1)
                   for _ in range(2)]
        prompt, chosen, rejected = ([rng.randint(10, vocab - 1) for _ in range(k)] for k in (p, *answers))
        out.append((prompt, chosen, rejected))
    return out


def real_tokens(pairs: list[tuple[list[int], list[int], list[int]]]) -> int:
    """Tokens of prompt+chosen+EOS and prompt+rejected+EOS, padding excluded: the tokens/s numerator."""
    return sum(2 * len(p) + len(c) + len(r) + 2 for p, c, r in pairs)


def padded_tokens(pairs: list[tuple[list[int], list[int], list[int]]], per_batch: int) -> int:
    """Tokens of the right-padded batches of `per_batch` pairs, in this order (2 rows a pair, each as wide as the
    batch's longest row)."""
    total = 0
    for i in range(0, len(pairs), per_batch):
        chunk = pairs[i:i + per_batch]
        total += 2 * len(chunk) * max(len(p) + max(len(c), len(r)) + 1 for p, c, r in chunk)
    return total


def _shape(size: str) -> tuple[dict, object]:
    """(the shape's fields, its transformers config): seed_recipe.model_config's for the bench sizes (importing
    seed_recipe loads transformers' Trainer: seconds), a tiny Llama with a 512-token vocabulary for the smoke."""
    ids = dict(max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if size == "tiny":
        from transformers import LlamaConfig
        return SMOKE_SHAPE, LlamaConfig(**SMOKE_SHAPE, **ids)
    import seed_recipe
    return seed_recipe.SIZES[size], seed_recipe.model_config(size, **ids)


def make(size: str, folder: Path, n: int, max_len: int) -> None:
    """The model folder (random-init weights in bf16 on the GPU, fp32 on the CPU; a word-level tokenizer, word "t<i>"
    being token i as in unsloth_recipe.make_model, with TEMPLATE), made in FOLDER.partial and renamed when complete
    so that a run killed meanwhile leaves no half folder to reuse, unless already there; then pairs.jsonl (n pairs)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    fields, mcfg = _shape(size)
    made = json.dumps({"size": size, **fields}, sort_keys=True)
    marker = folder / "made.json"
    if folder.exists() and not (marker.is_file() and marker.read_text() == made):
        raise SystemExit(f"{folder} is not a model this script made for size {size}: remove it or pass --folder")
    if not folder.exists():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # this script's own unfinished folder
        torch.manual_seed(0)
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(dev):
            AutoModelForCausalLM.from_config(mcfg, dtype=torch.bfloat16 if dev == "cuda" else torch.float32
                                             ).save_pretrained(partial)
        vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, fields["vocab_size"])}}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>", model_max_length=4096, padding_side="right",
                                chat_template=TEMPLATE).save_pretrained(partial)
        (partial / "made.json").write_text(made)
        partial.rename(folder)
    words = lambda ids: "".join(f" t{i}" for i in ids)  # noqa: E731
    with (folder / "pairs.jsonl").open("w") as fh:
        for p, c, r in synthetic_pairs(n, max_len, min(fields["vocab_size"], 120001)):
            fh.write(json.dumps({"prompt": words(p)[1:], "chosen": words(c), "rejected": words(r)}) + "\n")


def _device() -> tuple[str, str]:
    import torch
    return ("cuda", torch.cuda.get_device_name()) if torch.cuda.is_available() else ("cpu", "cpu")


def _memory(dev: str) -> dict:
    import torch
    if dev != "cuda":
        return dict(peak_gib=0.0, peak_reserved_gib=0.0)
    return dict(peak_gib=_gib(torch.cuda.max_memory_allocated()),
                peak_reserved_gib=_gib(torch.cuda.max_memory_reserved()))


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def _timing(times: list[float], real: int, wall: float) -> dict:
    return dict(steps=len(times), tok_s=round(real / wall), real_tokens=real,
                step_median_s=round(statistics.median(times), 4), step_max_s=round(max(times), 4),
                step_s=[round(t, 3) for t in times])


def slimtune_overrides(a: argparse.Namespace, folder: Path, run: Path) -> list[str]:
    """The slimtune recipe's config as command-line overrides (`slimtune estimate` takes the same)."""
    keys = {"model.path": folder, "data.train": folder / "pairs.jsonl", "data.eval_size": 0, "data.max_len": a.max_len,
            "method.name": "lora", "method.r": 16, "method.alpha": 16, "method.dropout": 0.0,
            "method.target_modules": "[" + ",".join(ALL_LINEAR) + "]", "train.objective": "dpo",
            "train.batch_size": a.pairs, "train.lr": 1e-4, "train.seed": 0, "train.max_steps": a.steps + a.warmup,
            "train.save_every": 0, "train.log_every": 1, "train.eval_at_start": "false", "train.output_dir": run}
    return [f"{k}={v}" for k, v in keys.items()]


def slimtune_worker(a: argparse.Namespace, folder: Path) -> dict:
    """slimtune.train on the folder's model and pairs; the estimator's prediction as train makes it, and the
    padding of the micro-batches its stream gives (the same seeded order fit reads)."""
    import slimtune
    from slimtune import models
    from slimtune.data.stream import MicroBatches
    from slimtune.engine import preference_step, preflight, run_plan
    from slimtune.engine.pair_logps import collate_pairs, input_tokens
    from slimtune.runs.metrics_log import read_metrics

    dev, name = _device()
    out = Path(tempfile.mkdtemp(prefix="dpo-run-"))
    cfg = slimtune.load_config(None, slimtune_overrides(a, folder, out / "run"))
    tokenizer = models.load_tokenizer(str(folder), False)
    built = preflight.records(cfg, tokenizer, lambda _: None)  # as train reads them, and `slimtune estimate`
    pairs, sizes = built.train, preflight.sizes(built)
    plan = run_plan.resolve(cfg, dev, sizes=sizes)
    stream = MicroBatches(preference_step.items(pairs, "dpo"), plan.micro_batch_size, cfg.train.seed)
    every = [next(stream) for _ in range((a.steps + a.warmup) * plan.grad_accum)]
    micro = every[a.warmup * plan.grad_accum:]  # the timed steps'
    width = lambda m: collate_pairs(m, 0, "cpu")["input_ids"].numel()  # noqa: E731
    widest = max(every, key=width)  # the run's largest micro-batch
    # train's prediction (its plan's longest records: what `slimtune estimate` prints), and for the largest
    # micro-batch this run trains on
    est, ran = (preflight.predict(cfg, plan, rows) for rows in (sizes, preference_step.sizes([i.pair for i in widest])))
    result = slimtune.train(cfg, show_progress=False, log=lambda text: print(text, file=sys.stderr, flush=True))
    rows = [r for r in read_metrics(out / "run" / "metrics.jsonl") if "loss" in r]
    done = json.loads((out / "run" / "summary.json").read_text())  # what the run took: kernels, parameters
    seen = [round(r["input_tokens_per_s"] * r["elapsed_s"]) for r in rows]  # input tokens of the steps so far
    real, wall = seen[-1] - seen[a.warmup - 1], rows[-1]["elapsed_s"] - rows[a.warmup - 1]["elapsed_s"]
    row = dict(tool="slimtune", recipe=f"slimtune dpo ({plan.micro_batch_size} x {plan.grad_accum} pairs)",
               plan=plan.describe(), **_memory(dev), **_timing([r["step_s"] for r in rows[a.warmup:]], real, wall),
               tokens_all_steps=seen[-1], stream_real_tokens=sum(input_tokens(m) for m in micro),
               padded_tokens=sum(map(width, micro)), pad_ratio=round(sum(map(width, micro)) / real - 1, 3),
               predicted_gib=_gib(est.peak), predicted_allocated_gib=_gib(est.peak_allocated),
               predicted_run_gib=_gib(ran.peak), predicted_run_allocated_gib=_gib(ran.peak_allocated),
               train_predicted_gib=round(result["predicted_peak_gib"], 2) if "predicted_peak_gib" in result else None,
               micro_batch_size=plan.micro_batch_size, grad_accum=plan.grad_accum, trainable_params=done.get(
                   "trainable_params"), kernels={k: done.get(k) for k in KERNELS},
               losses=[round(r["loss"], 4) for r in rows[a.warmup:]], device=name)
    if dev == "cuda":
        row["measured_over_predicted"] = round(row["peak_reserved_gib"] / row["predicted_gib"], 3)
        row["allocated_over_predicted"] = round(row["peak_gib"] / row["predicted_allocated_gib"], 3)
        row["measured_over_predicted_run"] = round(row["peak_reserved_gib"] / row["predicted_run_gib"], 3)
    return row


def trl_worker(a: argparse.Namespace, folder: Path) -> dict:
    """trl.DPOTrainer + peft on the folder's model and pairs, timed by a callback, tokens from its batches."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dev, name = _device()
    plain = _plain_logps_without_triton()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16 if dev == "cuda" else torch.float32,
                                                 device_map=dev)
    records = [json.loads(line) for line in (folder / "pairs.jsonl").open()]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    tokens: list[tuple[int, torch.Tensor, int]] = []  # (step it trained in, real tokens, padded tokens)

    class Counted(DPOTrainer):
        def training_step(self, model: torch.nn.Module, inputs: dict, *args: object, **kwargs: object) -> torch.Tensor:
            # the batch the step trains on, on the device: its real and padded tokens, kept without a device read
            tokens.append((self.state.global_step, inputs["attention_mask"].sum(), inputs["input_ids"].numel()))
            return super().training_step(model, inputs, *args, **kwargs)

    ends, times = [], []  # each step's end, and its time from on_step_begin

    class Clock(TrainerCallback):
        def on_step_begin(self, args: DPOConfig, state: object, control: object, **kw: object) -> None:
            sync()
            self.began = time.perf_counter()

        def on_step_end(self, args: DPOConfig, state: object, control: object, **kw: object) -> None:
            sync()
            ends.append(time.perf_counter())
            times.append(ends[-1] - self.began)

    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="dpo-trl-"), per_device_train_batch_size=a.trl_bs,
                     gradient_accumulation_steps=a.trl_ga, max_steps=a.steps + a.warmup, learning_rate=1e-4,
                     beta=0.1, loss_type=["sigmoid"], max_length=a.max_len, gradient_checkpointing=True,
                     bf16=dev == "cuda", use_cpu=dev == "cpu", eval_strategy="no", save_strategy="no",
                     report_to="none", logging_steps=10_000, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=ALL_LINEAR, task_type="CAUSAL_LM")
    trainer = Counted(model=model, args=args, train_dataset=Dataset.from_list(records), processing_class=tokenizer,
                      peft_config=lora, callbacks=[Clock()])
    trainer.train()
    real = sum(int(n) for step, n, _ in tokens if step >= a.warmup)
    padded = sum(p for step, _, p in tokens if step >= a.warmup)
    row = dict(tool="trl", recipe=f"trl DPOTrainer + peft ({a.trl_bs} x {a.trl_ga} pairs, gradient checkpointing)",
               **_memory(dev), **_timing(times[a.warmup:], real, ends[-1] - ends[a.warmup - 1]),
               tokens_all_steps=sum(int(n) for _, n, _ in tokens), padded_tokens=padded,
               pad_ratio=round(padded / real - 1, 3), micro_batch_size=a.trl_bs, grad_accum=a.trl_ga, device=name,
               trainable_params=sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    if plain:
        row["note"] = "TRL's Triton log-prob kernel replaced by plain torch (no Triton here): a plumbing check only"
    return row


def _plain_logps_without_triton() -> bool:
    """Where Triton is missing (the CPU smoke), TRL's fused head has no kernel: give it a plain torch one, which
    computes the same log-probabilities with every logit at once. True when it did."""
    import torch
    from trl.trainer import utils

    if utils._ChunkedLogProbFunction is not None:
        return False

    class Plain:
        @staticmethod
        def apply(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                  temperature: float, chunk: int, softcap: float | None = None, scale: float = 1.0,
                  outputs: tuple[str, ...] = ()) -> tuple[torch.Tensor | None, ...]:
            logits = torch.nn.functional.linear(hidden, weight, bias).float() * scale / temperature
            every = logits.log_softmax(-1)
            extra = {"entropy": -(every.exp() * every).sum(-1), "log_sum_sq_probs": (2 * every).logsumexp(-1),
                     "mean_logits": logits.mean(-1), "is_top1": logits.argmax(-1) == targets}
            return every.gather(1, targets[:, None]).squeeze(1), *(extra[k] if k in outputs else None for k in extra)
    utils._ChunkedLogProbFunction = Plain
    return True


def _versions() -> dict:
    import importlib.metadata as md
    import importlib.util
    return {p: md.version(p) if importlib.util.find_spec(p) else None for p in ("torch", "transformers", "peft", "trl")}


def _run(cmd: list[str], env: dict) -> list[dict]:
    """One recipe's process; its result rows ('RESULT {...}' lines; its stderr passes through)."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT {")]
    print(f"{' '.join(cmd[1:])}: rc {proc.returncode}, {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    return found


def folder_for(a: argparse.Namespace) -> Path:
    if a.folder:
        return Path(a.folder)
    shm = Path("/dev/shm")
    base = shm if a.size != "tiny" and shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"slimtune-dpo-{a.size}"


def summary(rows: list[dict]) -> list[str]:
    lines = [f"{r['size']} {r['tool']}: {r.get('tok_s', 0):,} tok/s, peak {r['peak_gib']} GiB allocated "
             f"({r['peak_reserved_gib']} reserved), median step {r.get('step_median_s')} s, slowest "
             f"{r.get('step_max_s')} s, padded/real tokens - 1: {r.get('pad_ratio')}"
             + (f", predicted {r['predicted_gib']} GiB reserved ({r['predicted_run_gib']} for the run's largest "
                "micro-batch)" if "predicted_gib" in r else "")
             + (f" ({r['error']})" if "error" in r else "") for r in rows]
    ours = next((r for r in rows if r["tool"] == "slimtune" and r.get("tok_s")), None)
    peer = next((r for r in rows if r["tool"] == "trl" and r.get("tok_s")), None)
    if ours and peer:
        lines.append(f"slimtune / trl: speed {ours['tok_s'] / peer['tok_s']:.2f}x, memory "
                     f"{ours['peak_gib'] / max(peer['peak_gib'], 1e-9):.2f}x")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="8b", help="tiny, 1b, 8b, qwen7b (seed_recipe.SIZES)")
    ap.add_argument("--recipes", default="slimtune,trl")
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--trl_bs", type=int, default=8, help="trl: per_device_train_batch_size")
    ap.add_argument("--trl_ga", type=int, default=1, help="trl: gradient_accumulation_steps")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shape (vocabulary 512), at most 2 pairs a step, 2 steps after 1 warm-up, rows of at "
                    "most 96 tokens: seconds on the CPU")
    ap.add_argument("--make", action="store_true", help="only make the model folder and pairs.jsonl")
    ap.add_argument("--folder", default="", help="model folder (default /dev/shm/slimtune-dpo-SIZE)")
    ap.add_argument("--worker", default="", help="run this recipe in this process (slimtune or trl)")
    ap.add_argument("--out", default="", help="append each result as a JSON line to this file")
    a = ap.parse_args(argv)
    if a.smoke:
        a.size, a.steps, a.warmup, a.max_len = "tiny", min(a.steps, 2), min(a.warmup, 1), min(a.max_len, 96)
        a.pairs, a.trl_bs, a.trl_ga = min(a.pairs, 2), min(a.pairs, 2), 1
    folder = folder_for(a)
    if a.worker:
        import torch
        try:
            row = {"slimtune": slimtune_worker, "trl": trl_worker}[a.worker](a, folder)
        except torch.OutOfMemoryError as err:  # a row that says so (trl: try --trl_bs 4 --trl_ga 2)
            row = dict(tool=a.worker, tok_s=0, error=f"out of memory: {str(err)[:200]}", **_memory("cuda"),
                       device=_device()[1])
        row = dict(row, bench="dpo", size=a.size, pairs_per_step=a.pairs, max_len=a.max_len, lora="r16 all-linear",
                   versions=_versions(), date=str(datetime.date.today()))
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    n = a.pairs * (a.steps + a.warmup)
    if a.trl_bs * a.trl_ga != a.pairs:
        raise SystemExit(f"--trl_bs {a.trl_bs} x --trl_ga {a.trl_ga} must equal --pairs {a.pairs}")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH", "")])),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if a.smoke:  # tiny models gain nothing from a second thread, and on a busy CPU two spin waiting for each other
        env.setdefault("OMP_NUM_THREADS", "1")
    flags = ["--size", a.size, "--steps", str(a.steps), "--warmup", str(a.warmup), "--pairs", str(a.pairs),
             "--max_len", str(a.max_len), "--trl_bs", str(a.trl_bs), "--trl_ga", str(a.trl_ga), "--folder", str(folder)]
    make_cmd = [sys.executable, "-c", f"import sys; sys.path[:0] = [{str(HERE)!r}]; import preference_speed as p; "
                f"from pathlib import Path; p.make({a.size!r}, Path({str(folder)!r}), {n}, {a.max_len})"]
    t0 = time.perf_counter()
    if subprocess.run(make_cmd, cwd=ROOT, env=env, stdout=sys.stderr).returncode:
        return 1
    print(f"model and {n} pairs in {folder}: {time.perf_counter() - t0:.0f}s", file=sys.stderr, flush=True)
    if a.make:
        return 0
    rows = []
    for recipe in a.recipes.split(","):
        for row in _run([sys.executable, str(Path(__file__)), "--worker", recipe, *flags], env):
            if a.out:  # each recipe's row at once: a time limit keeps the finished ones
                Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                with open(a.out, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
            rows.append(row)
    print("\n".join(summary(rows)))
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
