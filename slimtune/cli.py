"""The `slimtune` command: train | inspect | chat | generate | eval | targets | params | estimate | merge | demo
| compare | config."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

from . import config as config_mod
from .errors import MissingFileError, SlimtuneError

EPILOG = "Config overrides use dotted names: slimtune train cfg.yaml train.lr=2e-4 method.r=16"
TRUST_HELP = ("run the model folder's own Python (auto_map in its config.json); only when you trust it. A run "
              "folder's config.yaml never switches this on")


def _gpus(text: str) -> int:
    """--gpus: a count of GPUs, at least 1 (0, the default, means train.gpus)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of GPUs (1 or more), got {text!r}")
    return n


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimtune", description="Fine-tune language models on small hardware.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an adapter from a YAML config", epilog=EPILOG)
    t.add_argument("config", nargs="?", help="YAML config file (optional: defaults + overrides)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4")
    t.add_argument("--model", help="same as model.path=...")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--help-config", action="store_true", help="list every config key (dotted) with its type, "
                   "default, allowed values and what it does, and exit")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in train.output_dir "
                   "(only the files slimtune wrote there are removed)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in "
                   "train.output_dir (same as train.resume=auto)")
    t.add_argument("--gpus", type=_gpus, default=0, help="train on N GPUs of this machine through torchrun + FSDP2 "
                   "(same as train.gpus=N; under torchrun the launcher's process count rules)")

    i = sub.add_parser("inspect", help="show how records are encoded: prompt (masked) and trained parts")
    i.add_argument("data", help="alpaca JSON/JSONL, messages JSONL, or a save_to_disk folder")
    i.add_argument("--model", default="embedded", help="model folder, .gguf file, or 'embedded'")
    i.add_argument("--template", default="auto", choices=config_mod.CHOICES["data.template"])
    i.add_argument("--json", action="store_true", help="one JSON object per record: input_ids, labels")
    i.add_argument("-n", type=int, default=3, help="records to show (0 = all)")
    i.add_argument("--max-len", type=int, default=100_000)
    i.add_argument("--system", default="", help="default system prompt")
    i.add_argument("--train-on-prompt", action="store_true")
    i.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)

    for name, help_ in (("chat", "chat with a trained run, same template as training"),
                        ("generate", "batched answers for a file of prompts")):
        g = sub.add_parser(name, help=help_)
        g.add_argument("folder", help="a run folder written by `slimtune train`, or a .gguf file (`slimtune export`)")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        g.add_argument("--temperature", type=float, default=0.7, help="with --sample")
        g.add_argument("--top-p", type=float, default=0.9, help="with --sample (1 = off)")
        g.add_argument("--top-k", type=int, default=50, help="with --sample (0 = off)")
        g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
        g.add_argument("--seed", type=int, help="with --sample: the same seed gives the same answers")
        g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        g.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
        if name == "generate":
            g.add_argument("--input", required=True, help="prompts: alpaca records or messages ending with user")
            g.add_argument("--output", required=True, help="JSONL: each input record plus 'prediction'")
            g.add_argument("--batch-size", type=int, help="prompts per batch (default: 64 on CUDA, 8 on the CPU)")
            g.add_argument("--max-len", type=int, default=0, help="prompts longer than this keep their last "
                           "MAX_LEN tokens (default: the run's data.max_len)")
            g.add_argument("--no-progress", action="store_true", help="no progress bar")
        else:
            g.add_argument("--system", default="", help="system prompt for this chat")
            g.add_argument("--save", help="keep the transcript in this JSONL file ({\"messages\": [...]}, as "
                           "training data reads it), rewritten after every answer")

    tg = sub.add_parser("targets", help="list a model's Linear/Conv1D modules (LoRA targets), shapes, counts")
    tg.add_argument("model", help="model folder (config.json is enough), .gguf file, or 'embedded'")
    tg.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)

    pc = sub.add_parser("params", help="trainable / total parameters of a config's method, from config.json "
                                       "alone (built on the meta device, no weights loaded)")
    pc.add_argument("config", nargs="?")
    pc.add_argument("overrides", nargs="*")
    pc.add_argument("--model", help="same as model.path=...")

    es = sub.add_parser("estimate", help="predicted peak GPU memory of a config, by component, before any run")
    es.add_argument("config", nargs="?")
    es.add_argument("overrides", nargs="*")
    es.add_argument("--model", help="same as model.path=...")
    es.add_argument("--budget", help="GPU memory available, e.g. 24 (GiB), 24GiB or 1500MiB: says whether the run "
                    "fits and what would")
    es.add_argument("--gpus", type=_gpus, default=0,
                    help="per-GPU peak of an FSDP2 run over N GPUs (default train.gpus)")

    mg = sub.add_parser("merge", help="merge a run's adapter or trained parts into a plain transformers model")
    mg.add_argument("folder", help="a run folder written by `slimtune train`")
    mg.add_argument("--output", required=True, help="folder for the merged model")
    mg.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    mg.add_argument("--overwrite", action="store_true", help="replace the merged model already in --output")
    mg.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP + " (and copies it into the output "
                    "only then)")

    ex = sub.add_parser("export", help="write a run (merged first) or a merged folder as GGUF for llama.cpp / Ollama")
    ex.add_argument("folder", help="a run folder written by `slimtune train`, or a merged model folder")
    ex.add_argument("--format", default="gguf", choices=["gguf", "ollama"],
                    help="ollama: also a Modelfile beside the GGUF (template and stop tokens)")
    ex.add_argument("--output", required=True, help="the .gguf file to write")
    ex.add_argument("--quant", default="f16", choices=["f16", "bf16", "q8_0", "q4_0", "q4_k_m"],
                    help="weight type (1-D tensors stay F32); q4_k_m keeps output and some attn_v/ffn_down at 6 bits")
    ex.add_argument("--imatrix", default="auto", metavar="auto|off|FILE",
                    help="q4_0/q4_k_m: weigh each column's rounding error by its mean squared activation on records "
                         "(auto: the run's training data, for a merged folder the demo's; FILE: records; off: none)")

    ev = sub.add_parser("eval", help="loss and perplexity on the answer tokens of a test set; with --generate "
                                     "also EM, F1, BLEU-4, ROUGE (and --extraction item-set P/R/F1)")
    ev.add_argument("folder", nargs="?", help="a run folder written by `slimtune train` (or give --base)")
    ev.add_argument("--data", required=True, help="test records (alpaca or messages); the last answer is the reference")
    ev.add_argument("--base", help="evaluate this model with no adapter: folder, .gguf file, or 'embedded'")
    ev.add_argument("--template", choices=config_mod.CHOICES["data.template"],
                    help="with --base: the chat template (default auto); a run uses its own")
    ev.add_argument("--system", help="system prompt (default: the run's data.system)")
    ev.add_argument("--output", help="folder for scores.json and predictions.jsonl (default: FOLDER/eval-<data>)")
    ev.add_argument("--generate", action="store_true", help="generate answers (greedy) and score them")
    ev.add_argument("--extraction", action="store_true", help="also score answers as sets of items "
                                                              "(implies --generate)")
    ev.add_argument("--separator", default="\\n", help="between extraction items (default: newline; \\t = tab)")
    ev.add_argument("--max-new-tokens", type=int, default=256)
    ev.add_argument("--batch-size", type=int, help="records per batch (default: 8; generation 64 on CUDA)")
    ev.add_argument("--max-len", type=int, default=0, help="tokens per record (default: the run's data.max_len)")
    ev.add_argument("--limit", type=int, default=0, help="only the first N records (0 = all)")
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")

    cp = sub.add_parser("compare", help="train and score several methods on the same data, seed and budget: "
                                        "table, charts and a report page", epilog=EPILOG)
    cp.add_argument("config", help="training config; its optional compare: section lists rows and overrides")
    cp.add_argument("overrides", nargs="*", help="dotted overrides for every row, e.g. train.max_steps=50")
    cp.add_argument("--methods", help="comma-separated rows, e.g. base,lora,dora,freeze,prompt_tuning,full "
                                      "(default: the config's compare.methods; base = the model untrained)")
    cp.add_argument("--output", help="folder for the runs and compare.json/.md/.html (default: "
                                     "compare/<config name>); run again to go on after an interruption")

    cf = sub.add_parser("config", help="print the resolved config; --explain: every key with its type, default, "
                                       "allowed values and what it does", epilog=EPILOG)
    cf.add_argument("config", nargs="?")
    cf.add_argument("overrides", nargs="*")
    cf.add_argument("--model", help="same as model.path=...")
    cf.add_argument("--explain", action="store_true", help="the key reference (as `slimtune train --help-config`)")

    d = sub.add_parser("demo", help="the end-to-end demo on the embedded model and real data")
    d.add_argument("--output-dir", default="demo_out")
    d.add_argument("--steps", type=int, default=0, help="override the demo's step count")
    return p


def _config(args) -> config_mod.Config:
    """The config from the command line; items may come in any order around the flags: the one without
    "=" (or that names an existing file) is the YAML, the others dotted overrides. Warnings about method.*
    keys that do nothing go to stderr."""
    items = ([args.config] if args.config else []) + list(args.overrides)
    files = [x for x in items if "=" not in x or Path(x).is_file()]
    if len(files) > 1:
        raise config_mod.ConfigError(f"two config files given ({files[0]}, {files[1]}); give one YAML file, then "
                                     "dotted overrides such as train.lr=2e-4")
    overrides = [x for x in items if x not in files]
    if args.model:
        overrides.append(f"model.path={args.model}")
    cfg = config_mod.load(files[0] if files else None, overrides)
    for text in config_mod.unused(cfg):
        print(f"slimtune {args.command}: warning: {text}", file=sys.stderr)
    return cfg


# subcommands whose dotted overrides may also come after a flag (`train cfg.yaml --no-progress train.lr=2e-3`):
# argparse ends a nargs="*" positional at the first flag, so the rest arrive as unrecognized arguments
TAKES_OVERRIDES = ("train", "params", "estimate", "config")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    odd = [x for x in extra if args.command not in TAKES_OVERRIDES or x.startswith("-")
           or not ("=" in x or Path(x).is_file())]
    if odd:
        parser.error(f"unrecognized arguments: {' '.join(odd)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    return args


def cmd_train(args) -> int:
    from .engine import distributed
    from .train import run

    if args.help_config:  # before the config is read: help must work while a config is broken
        print(config_mod.explain())
        return 0
    cfg = _config(args)
    if args.print_config:
        print(config_mod.dump(cfg), end="")
        return 0
    gpus = args.gpus or cfg.train.gpus
    if gpus > 1 and not distributed.launched():
        return _torchrun(gpus, args.raw)
    protect = (args.config,) if args.config and Path(args.config).is_file() else ()
    try:
        result = run(cfg, overwrite=args.overwrite, show_progress=not args.no_progress, resume=args.resume,
                     protect=protect)
    finally:
        distributed.close()
    # a stopped run is not a finished one: 128 + the signal number, as a shell reports it, so a
    # scheduler does not record a preempted job as done
    stopped = result.get("interrupted")
    return 128 + signal.Signals[stopped].value if stopped else 0


def _torchrun(gpus: int, argv: list[str]) -> int:
    """`slimtune train ... --gpus N`: the same command under torchrun, N processes on this machine."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--gpus":
            skip = True
        elif not a.startswith("--gpus="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           "-m", "slimtune", *rest, f"train.gpus={gpus}"]
    print("slimtune: " + " ".join(cmd[1:]), file=sys.stderr, flush=True)
    return subprocess.call(cmd)


def _segments(ids: list[int], labels: list[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive runs of prompt (False) and trained (True) tokens."""
    out: list[tuple[bool, list[int]]] = []
    for tid, lab in zip(ids, labels):
        trained = lab != -100
        if out and out[-1][0] == trained:
            out[-1][1].append(tid)
        else:
            out.append((trained, [tid]))
    return out


def cmd_inspect(args) -> int:
    from . import models
    from .data import encode_examples, read

    examples = read(args.data)
    if args.n:
        examples = examples[: args.n]
    tokenizer = models.load_tokenizer(args.model, args.trust_remote_code)
    cfg_data = config_mod.DataConfig(template=args.template, max_len=args.max_len, system=args.system,
                                     train_on_prompt=args.train_on_prompt)
    encoded, stats = encode_examples(examples, tokenizer, cfg_data)
    for enc in encoded:
        if args.json:
            print(json.dumps({"where": enc.where, "input_ids": enc.input_ids, "labels": enc.labels}))
            continue
        trained = sum(1 for x in enc.labels if x != -100)
        print(f"=== {enc.where}: {len(enc.input_ids)} tokens, {len(enc.input_ids) - trained} prompt (masked), "
              f"{trained} trained{', TRUNCATED' if enc.truncated else ''}")
        for is_trained, ids in _segments(enc.input_ids, enc.labels):
            tag = "TRAINED" if is_trained else "PROMPT "
            text = tokenizer.decode(ids, skip_special_tokens=False)
            print("\n".join(f"{tag} | {line}" for line in text.split("\n")))
    if not args.json:
        print(stats.summary("inspect", args.max_len))
    return 0


def check_run(folder: str | Path) -> None:
    """Before any model loads: a run folder that never trained, or stopped before saving its adapter, is
    named for what it is (with the checkpoint to use instead), not as a missing file."""
    from .engine import checkpoint
    from .export import parts

    out = Path(folder)
    if not out.is_dir():
        raise MissingFileError(f"{out}: no such run folder (give the train.output_dir of a `slimtune train` run)")
    if (out / "adapter_config.json").is_file() or (out / parts.PARTS).is_file():
        return
    last = checkpoint.latest(out)
    if last is not None:
        raise MissingFileError(f"{out}: training stopped before saving the final adapter; its newest checkpoint is "
                               f"{last}: pass that folder instead, or `slimtune train {out / 'config.yaml'} "
                               "--resume` to finish the run")
    if (out / "config.yaml").is_file() and not (out / "metrics.jsonl").is_file():
        raise MissingFileError(f"training never started in {out} (no metrics.jsonl, no checkpoint): its config.yaml "
                               "was written, then the run was refused or stopped before its first step (see "
                               f"that command's error); run `slimtune train {out / 'config.yaml'}` first")
    if (out / "config.yaml").is_file():
        raise MissingFileError(f"{out}: training started (metrics.jsonl) but saved no adapter and no checkpoint; "
                               f"run `slimtune train {out / 'config.yaml'} --overwrite` again")
    raise MissingFileError(f"{out}: not a slimtune run folder (no config.yaml, adapter or checkpoint)")


def _load_for_inference(args):
    from .export.peft_format import load_run
    from .models import pick_device

    device = pick_device(args.device)
    if str(args.folder).endswith(".gguf"):  # an exported file: its own chat template, no run config
        from . import models

        model, tokenizer = models.load(args.folder, device=device)
        return model.eval(), tokenizer, config_mod.load(None, [f"model.path={args.folder}"]), device
    check_run(args.folder)
    model, tokenizer, cfg = load_run(args.folder, device, trust_remote_code=args.trust_remote_code)
    return model, tokenizer, cfg, device


def _sampling(args):
    from .evaluate.generate import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def _write_atomic(path: Path, rows) -> None:
    """JSONL written to a temporary file beside `path`, renamed over it at the end: a crash leaves no
    half-written file (generate once wrote 2 of 5 rows and then failed) and an old file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def cmd_generate(args) -> int:
    from .data import with_system
    from .data.readers import read_prompts
    from .evaluate.generate import run

    prompts, raw = read_prompts(args.input)
    model, tokenizer, cfg, device = _load_for_inference(args)
    convs = [with_system(p, cfg.data.system) for p in prompts]
    max_len = args.max_len or cfg.data.max_len
    gen = run(model, tokenizer, cfg.data.template, convs, _sampling(args), args.batch_size, device,
              max_len=max_len, show_progress=not args.no_progress)
    out = Path(args.output)
    _write_atomic(out, (dict(rec, prediction=ans) for rec, ans in zip(raw, gen.texts)))
    unfinished = sum(not x for x in gen.stopped)
    print(f"wrote {len(gen.texts)} answers to {out}: {gen.new_tokens} new tokens in {gen.seconds:.1f} s "
          f"({gen.tokens_per_s:.1f} tokens/s on {device}); {unfinished} hit --max-new-tokens={args.max_new_tokens}; "
          f"{gen.truncated} prompts cut to their last {max_len} tokens (--max-len)")
    return 0


def cmd_chat(args) -> int:
    model, tokenizer, cfg, device = _load_for_inference(args)
    system = args.system or cfg.data.system
    chat_loop(model, tokenizer, cfg.data.template, device, _sampling(args), system,
              save=Path(args.save) if args.save else None)
    return 0


def chat_loop(model, tokenizer, template: str, device: str, sampling, system: str = "", read=None,
              save: Path | None = None) -> list[dict]:
    """Read a line (with `read`, default input()), answer it, until /exit, Ctrl-D or Ctrl-C at the prompt;
    returns the conversation. Ctrl-C while an answer is generated drops that answer and its question and
    goes back to the prompt."""
    from transformers import TextStreamer

    from .evaluate.generate import run

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints as tokens arrive
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    earlier: list[list[dict]] = []  # conversations ended by /reset, kept in the transcript
    print("chat with the trained model; /reset clears the history, /exit (or Ctrl-D, Ctrl-C) quits; Ctrl-C during "
          "an answer stops it", file=sys.stderr)
    while True:
        try:
            line = (read or input)("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            earlier += [history] if any(m["role"] == "assistant" for m in history) else []
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        print("assistant> ", end="", flush=True)
        try:
            gen = run(model, tokenizer, template, [history + [{"role": "user", "content": line}]], sampling, 1,
                      device, streamer=streamer)
        except KeyboardInterrupt:
            print("\n[stopped: this answer and its question are left out of the conversation]", file=sys.stderr)
            continue
        print(f"[{gen.new_tokens} tokens, {gen.tokens_per_s:.1f} tokens/s]", file=sys.stderr, flush=True)
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": gen.texts[0]}]
        if save:
            _write_atomic(save, [{"messages": conv} for conv in earlier + [history]])
    turns = sum(m["role"] == "assistant" for conv in earlier + [history] for m in conv)
    print(f"transcript ({turns} answers) saved to {save}" if save else
          "transcript not saved (--save FILE keeps it)", file=sys.stderr)
    return history


def cmd_targets(args) -> int:
    import torch
    from transformers import AutoModelForCausalLM

    from . import models
    from .methods.targets import describe

    mcfg = models.load_config(args.model, args.trust_remote_code)
    with torch.device("meta"):  # shapes only: no weights are read
        model = AutoModelForCausalLM.from_config(mcfg, trust_remote_code=args.trust_remote_code)
    print(describe(model))
    return 0


def cmd_params(args) -> int:
    from .methods import count_on_meta

    cfg = _config(args)
    trainable, total = count_on_meta(cfg.model.path, cfg.method, cfg.model.trust_remote_code)
    print(f"method {cfg.method.name}: trainable params: {trainable:,} || all params: {total:,} || "
          f"trainable%: {100 * trainable / total:.4f}")
    return 0


def cmd_estimate(args) -> int:
    from .engine import memory

    cfg = _config(args)
    budget = memory.parse_size(args.budget) if args.budget else None
    rows = None
    if cfg.data.train:
        from . import models

        rows = memory.data_rows(cfg, models.load_tokenizer(cfg.model.path, cfg.model.trust_remote_code))
    gpus = args.gpus or cfg.train.gpus
    est = memory.estimate(cfg, rows, gpus)
    where = f"the longest {len(rows)} records of {cfg.data.train}" if rows else \
        f"{cfg.train.micro_batch_size} x {cfg.data.max_len} tokens (no data given: worst case)"
    print(f"slimtune estimate: {cfg.method.name}, {memory._plan(cfg).name}, micro-batch {where}, "
          f"checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}")
    print(est.table())
    quick = memory.faster(cfg, rows) if gpus <= 1 else None
    if quick and (budget is None or quick[1] <= budget):
        print(f"faster on a GPU, same records per step: {quick[0]} (predicted {quick[1] / memory.GIB:.2f} GiB "
              "with the CUDA context)")
    if budget is not None:
        total = est.peak + est.cuda_context
        verdict = "fits" if total <= budget else "does NOT fit"
        print(f"budget {budget / memory.GIB:.1f} GiB: predicted {total / memory.GIB:.2f} GiB with the CUDA context: "
              f"{verdict}")
        if total > budget:
            fixes = memory.suggestions(cfg, budget, rows)
            print("changes that fit:" if fixes else "no single change fits; combine them or use a larger GPU")
            for text, peak in sorted(fixes, key=lambda x: -x[1]):
                print(f"  {text:<50} {peak / memory.GIB:8.2f} GiB")
            return 0 if fixes else 1
    return 0


def cmd_eval(args) -> int:
    from .data.readers import DataError
    from .evaluate.generate import Sampling
    from .evaluate.report import main as eval_main
    from .models import pick_device

    if args.folder and (args.base or args.template):
        raise DataError("eval: give a run folder, or --base MODEL [--template T], not both (a run uses its "
                        "own model and template)")
    if args.folder:
        check_run(args.folder)
    sep = args.separator.replace("\\n", "\n").replace("\\t", "\t")
    eval_main(args.folder, args.data, base=args.base, template=args.template or "auto", output=args.output,
              generate=args.generate, extraction_sep=sep if args.extraction else None,
              sampling=Sampling(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size,
              device=pick_device(args.device), limit=args.limit, max_len=args.max_len, system=args.system,
              trust_remote_code=args.trust_remote_code, show_progress=not args.no_progress)
    return 0


def cmd_merge(args) -> int:
    from .export.merge import merge

    merge(args.folder, args.output, args.dtype, overwrite=args.overwrite, trust_remote_code=args.trust_remote_code)
    return 0


def cmd_export(args) -> int:
    from .export.gguf import export

    export(args.folder, args.output, args.quant, args.format, imatrix=args.imatrix)
    return 0


def cmd_compare(args) -> int:
    from .compare import compare
    from .compare.runner import Interrupted

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:
        rows = compare(args.config, methods, args.overrides, args.output)
    except Interrupted as err:
        print(f"slimtune compare: {err}; run the same command again to go on (finished rows are kept)",
              file=sys.stderr)
        return 130
    failed = [r["label"] for r in rows if r["status"] != "done"]
    if failed:  # a row that cannot run here is an answer too (its reason is in the table), not an error
        print(f"slimtune compare: {len(failed)} of {len(rows)} rows failed: {', '.join(failed)}", file=sys.stderr)
    return 0


def cmd_config(args) -> int:
    """The resolved config as YAML (as `train --print-config`), or with --explain the key reference."""
    if args.explain:
        print(config_mod.explain())
    else:
        print(config_mod.dump(_config(args)), end="")
    return 0


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(Path(args.output_dir), args.steps)


COMMANDS = {"train": cmd_train, "inspect": cmd_inspect, "generate": cmd_generate, "chat": cmd_chat,
            "targets": cmd_targets, "params": cmd_params, "estimate": cmd_estimate, "merge": cmd_merge,
            "eval": cmd_eval, "demo": cmd_demo, "export": cmd_export, "compare": cmd_compare, "config": cmd_config}


def main(argv: list[str] | None = None) -> int:
    # expandable segments: far less fragmentation, so reserved memory stays close to allocated (and to
    # `slimtune estimate`); must be set before CUDA initializes
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from .engine.log import quiet_warnings

    raw = list(sys.argv[1:] if argv is None else argv)
    args = _parse(raw)
    args.raw = raw
    where = f" (rank {os.environ.get('RANK')} of {os.environ['WORLD_SIZE']})" \
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        with quiet_warnings():
            return COMMANDS[args.command](args)
    # every error a user can cause is a SlimtuneError (errors.py); a missing or existing path that an
    # open() or mkdir() of a library met is one too, in effect: it names the path
    except (SlimtuneError, FileNotFoundError, FileExistsError) as err:
        print(f"slimtune {args.command}{where}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if not where:
            raise
        # torchrun stops the other ranks when one exits non-zero; name the one that failed
        import traceback

        traceback.print_exc()
        print(f"slimtune {args.command}{where}: error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
