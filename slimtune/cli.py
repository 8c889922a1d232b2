"""The `slimtune` command: train | inspect | chat | generate | eval | targets | params | estimate | merge | demo
| compare."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from . import config as config_mod

EPILOG = "Config overrides use dotted names: slimtune train cfg.yaml train.lr=2e-4 method.r=16"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimtune", description="Fine-tune language models on small hardware.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an adapter from a YAML config", epilog=EPILOG)
    t.add_argument("config", nargs="?", help="YAML config file (optional: defaults + overrides)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=2e-4")
    t.add_argument("--model", help="same as model.path=...")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in train.output_dir")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    t.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in "
                   "train.output_dir (same as train.resume=auto)")

    i = sub.add_parser("inspect", help="show how records are encoded: prompt (masked) and trained parts")
    i.add_argument("data", help="alpaca JSON/JSONL, messages JSONL, or a save_to_disk folder")
    i.add_argument("--model", default="embedded", help="model folder, .gguf file, or 'embedded'")
    i.add_argument("--template", default="auto", choices=config_mod.CHOICES["data.template"])
    i.add_argument("--json", action="store_true", help="one JSON object per record: input_ids, labels")
    i.add_argument("-n", type=int, default=3, help="records to show (0 = all)")
    i.add_argument("--max-len", type=int, default=100_000)
    i.add_argument("--system", default="", help="default system prompt")
    i.add_argument("--train-on-prompt", action="store_true")
    i.add_argument("--trust-remote-code", action="store_true")

    for name, help_ in (("chat", "chat with a trained run, same template as training"),
                        ("generate", "batched answers for a file of prompts")):
        g = sub.add_parser(name, help=help_)
        g.add_argument("folder", help="a run folder written by `slimtune train`")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
        g.add_argument("--temperature", type=float, default=0.7, help="with --sample")
        g.add_argument("--top-p", type=float, default=0.9, help="with --sample (1 = off)")
        g.add_argument("--top-k", type=int, default=50, help="with --sample (0 = off)")
        g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
        g.add_argument("--seed", type=int, help="with --sample: the same seed gives the same answers")
        g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        if name == "generate":
            g.add_argument("--input", required=True, help="prompts: alpaca records or messages ending with user")
            g.add_argument("--output", required=True, help="JSONL: each input record plus 'prediction'")
            g.add_argument("--batch-size", type=int, help="prompts per batch (default: 64 on CUDA, 8 on the CPU)")
        else:
            g.add_argument("--system", default="", help="system prompt for this chat")

    tg = sub.add_parser("targets", help="list a model's Linear/Conv1D modules (LoRA targets), shapes, counts")
    tg.add_argument("model", help="model folder (config.json is enough), .gguf file, or 'embedded'")
    tg.add_argument("--trust-remote-code", action="store_true")

    pc = sub.add_parser("params", help="trainable / total parameters of a config's method, from config.json "
                                       "alone (built on the meta device, no weights loaded)")
    pc.add_argument("config", nargs="?")
    pc.add_argument("overrides", nargs="*")
    pc.add_argument("--model", help="same as model.path=...")

    es = sub.add_parser("estimate", help="predicted peak GPU memory of a config, by component, before any run")
    es.add_argument("config", nargs="?")
    es.add_argument("overrides", nargs="*")
    es.add_argument("--model", help="same as model.path=...")
    es.add_argument("--budget", help="GPU memory available, e.g. 24GiB: says whether the run fits and what would")

    mg = sub.add_parser("merge", help="merge a run's adapter or trained parts into a plain transformers model")
    mg.add_argument("folder", help="a run folder written by `slimtune train`")
    mg.add_argument("--output", required=True, help="folder for the merged model")
    mg.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])

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

    cp = sub.add_parser("compare", help="train and score several methods on the same data, seed and budget: "
                                        "table, charts and a report page", epilog=EPILOG)
    cp.add_argument("config", help="training config; its optional compare: section lists rows and overrides")
    cp.add_argument("overrides", nargs="*", help="dotted overrides for every row, e.g. train.max_steps=50")
    cp.add_argument("--methods", help="comma-separated rows, e.g. base,lora,dora,freeze,prompt_tuning,full "
                                      "(default: the config's compare.methods; base = the model untrained)")
    cp.add_argument("--output", help="folder for the runs and compare.json/.md/.html (default: "
                                     "compare/<config name>); run again to go on after an interruption")

    d = sub.add_parser("demo", help="the end-to-end demo on the embedded model and real data")
    d.add_argument("--output-dir", default="demo_out")
    d.add_argument("--steps", type=int, default=0, help="override the demo's step count")
    return p


def _config(args) -> config_mod.Config:
    overrides = list(args.overrides)
    config_path = args.config
    if config_path and "=" in config_path and not Path(config_path).exists():
        overrides.insert(0, config_path)  # `slimtune train a.b=c` with no config file
        config_path = None
    if args.model:
        overrides.append(f"model.path={args.model}")
    return config_mod.load(config_path, overrides)


def cmd_train(args) -> int:
    from .train import run

    cfg = _config(args)
    if args.print_config:
        print(config_mod.dump(cfg), end="")
        return 0
    run(cfg, overwrite=args.overwrite, show_progress=not args.no_progress, resume=args.resume)
    return 0


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


def _load_for_inference(args):
    from .export.peft_format import load_run
    from .models import pick_device

    device = pick_device(args.device)
    model, tokenizer, cfg = load_run(args.folder, device)
    return model, tokenizer, cfg, device


def _sampling(args):
    from .evaluate.generate import Sampling

    return Sampling(max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                    top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed)


def cmd_generate(args) -> int:
    from .data import with_system
    from .data.readers import read_prompts
    from .evaluate.generate import run

    prompts, raw = read_prompts(args.input)
    model, tokenizer, cfg, device = _load_for_inference(args)
    convs = [with_system(p, cfg.data.system) for p in prompts]
    gen = run(model, tokenizer, cfg.data.template, convs, _sampling(args), args.batch_size, device)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for rec, ans in zip(raw, gen.texts):
            fh.write(json.dumps(dict(rec, prediction=ans), ensure_ascii=False) + "\n")
    unfinished = sum(not x for x in gen.stopped)
    print(f"wrote {len(gen.texts)} answers to {out}: {gen.new_tokens} new tokens in {gen.seconds:.1f} s "
          f"({gen.tokens_per_s:.1f} tokens/s on {device}); {unfinished} hit --max-new-tokens={args.max_new_tokens}")
    return 0


def cmd_chat(args) -> int:
    from transformers import TextStreamer

    from .evaluate.generate import run

    model, tokenizer, cfg, device = _load_for_inference(args)
    sampling = _sampling(args)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)  # prints as tokens arrive
    system = args.system or cfg.data.system
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    print("chat with the trained model; /reset clears the history, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        gen = run(model, tokenizer, cfg.data.template, [history], sampling, 1, device, streamer=streamer)
        print(f"[{gen.new_tokens} tokens, {gen.tokens_per_s:.1f} tokens/s]", file=sys.stderr, flush=True)
        history.append({"role": "assistant", "content": gen.texts[0]})
    return 0


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
    est = memory.estimate(cfg, rows)
    where = f"the longest {len(rows)} records of {cfg.data.train}" if rows else \
        f"{cfg.train.micro_batch_size} x {cfg.data.max_len} tokens (no data given: worst case)"
    print(f"slimtune estimate: {cfg.method.name}, {memory._plan(cfg).name}, micro-batch {where}, "
          f"checkpointing {'on' if cfg.train.gradient_checkpointing else 'off'}")
    print(est.table())
    quick = memory.faster(cfg, rows)
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
    sep = args.separator.replace("\\n", "\n").replace("\\t", "\t")
    eval_main(args.folder, args.data, base=args.base, template=args.template or "auto", output=args.output,
              generate=args.generate, extraction_sep=sep if args.extraction else None,
              sampling=Sampling(max_new_tokens=args.max_new_tokens), batch_size=args.batch_size,
              device=pick_device(args.device), limit=args.limit, max_len=args.max_len, system=args.system)
    return 0


def cmd_merge(args) -> int:
    from .export.merge import merge

    merge(args.folder, args.output, args.dtype)
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


def cmd_demo(args) -> int:
    from .demo import main as demo_main

    return demo_main(Path(args.output_dir), args.steps)


COMMANDS = {"train": cmd_train, "inspect": cmd_inspect, "generate": cmd_generate, "chat": cmd_chat,
            "targets": cmd_targets, "params": cmd_params, "estimate": cmd_estimate, "merge": cmd_merge,
            "eval": cmd_eval, "demo": cmd_demo, "compare": cmd_compare}


def main(argv: list[str] | None = None) -> int:
    # expandable segments: far less fragmentation, so reserved memory stays close to allocated (and to
    # `slimtune estimate`); must be set before CUDA initializes
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    from .data.readers import DataError
    from .data.templates import TemplateError
    from .engine.precision import PrecisionError
    from .export.merge import MergeError
    from .methods.base import MethodError
    from .methods.targets import TargetError

    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (config_mod.ConfigError, DataError, TemplateError, TargetError, MethodError, PrecisionError,
            MergeError, FileNotFoundError,
            FileExistsError) as err:
        print(f"slimtune {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
