"""GPU memory of slimtune's lora against qlora on a random-init 1B Llama-shaped model.

    python bench/methods_memory.py --make /tmp/llama-1b-random          # once: random weights, bf16
    python bench/methods_memory.py --method lora  --model /tmp/llama-1b-random
    python bench/methods_memory.py --method qlora --model /tmp/llama-1b-random

Run each method in its own process (bench/methods_memory.sh does): peak-memory counters and the
caching allocator then start clean for each. Everything goes through slimtune's own code:
models.load (bitsandbytes NF4 for qlora), slimtune.prepare (checkpointing, the method, precision), and
the training loop's step(), on synthetic batches (random token ids, the prompt half masked with -100).
Prints one JSON line and appends it to bench/results/<date>-<device>.jsonl (and to every --results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import sys
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GIB = 2 ** 30
MODEL_NAME = "llama-1b-random"
SHAPES = {
    # Llama-3.2-1B's shape
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # for a quick check of the script on the CPU
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}


def make(out: Path, shape: str, seed: int) -> None:
    """Random-init Llama-shaped model in bf16, saved as safetensors, plus a 3-token tokenizer:
    slimtune.models.load always loads a tokenizer beside the weights; the bench never uses it."""
    import torch
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init is quicker on a GPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2},
                                                                       unk_token="<pad>")),
                                  pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>")
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"made {out}: {shape} Llama, {n:,} parameters, bf16, safetensors", flush=True)


def synthetic(steps: int, micro: int, seq: int, vocab: int, seed: int):
    """steps lists of `micro` Encoded records: random ids, the first half of each a masked prompt."""
    from slimtune.data.encode import IGNORE, Encoded

    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        records = []
        for _ in range(micro):
            ids = [rng.randrange(3, vocab) for _ in range(seq)]
            labels = [IGNORE] * (seq // 2) + ids[seq // 2:]
            records.append(Encoded(ids, labels))
        out.append(records)
    return out


def device_tag(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100': the GPU's model, lowercased, for the results file name."""
    words = name.lower().replace("_", " ").split()
    if words and words[0] == "nvidia" and len(words) > 1:
        words = words[1:]
    return "-".join(words[:1]) or "gpu"


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    import torch

    out["torch"] = torch.__version__  # the running one (a carried wheel may shadow the image's)
    out["cuda"] = torch.version.cuda
    return out


def train(args) -> dict:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("methods_memory: no CUDA GPU is visible; this bench measures GPU memory "
                         "(run it on the GPU machine, or pass --device cpu for a logic check of lora)")
    import slimtune
    from slimtune import models
    from slimtune.config import Config, MethodConfig, TrainConfig
    from slimtune.data.collate import collate
    from slimtune.engine.loop import step
    from slimtune.engine.optim import build_optimizer, build_scheduler
    from slimtune.methods.quant import quantization_config

    cuda = args.device == "cuda"
    mcfg = MethodConfig(name=args.method, r=16, alpha=32.0, dropout=0.0, target_modules=["all-linear"],
                        quant_bits=4)
    tcfg = TrainConfig(lr=1e-4, weight_decay=0.0, warmup_steps=0, scheduler="constant", max_grad_norm=1.0,
                       micro_batch_size=args.micro, grad_accum=1, max_steps=args.steps, seed=args.seed,
                       gradient_checkpointing=True)
    torch.manual_seed(args.seed)
    caught: list[str] = []
    mem = {}

    def snap(key):
        if cuda:
            torch.cuda.synchronize()
            mem[key] = round(torch.cuda.memory_allocated() / GIB, 3)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quant = quantization_config(mcfg)  # None for lora; BitsAndBytesConfig(nf4, double quant) for qlora
        t0 = time.perf_counter()
        model, tokenizer = models.load(args.model, dtype="bf16", device=args.device, quantization=quant)
        load_s = time.perf_counter() - t0
        snap("weights_after_load_gib")
        model = slimtune.prepare(model, Config(method=mcfg, train=tcfg), args.device).model  # checkpointing too
        snap("after_apply_gib")
        trainable, total = slimtune.count_parameters(model)
        vocab = model.get_input_embeddings().weight.shape[0]
        optimizer = build_optimizer(model, tcfg)
        scheduler = build_scheduler(optimizer, args.steps, tcfg)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        data = synthetic(args.steps, args.micro, args.seq, vocab, args.seed)
        model.train()
        losses, seconds, grad_norms = [], [], []
        for records in data:
            batch = {k: v.to(args.device) for k, v in collate(records, pad).items()}
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            row = step(model, [batch], optimizer, scheduler, tcfg.max_grad_norm)
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
            losses.append(row["loss"])
            grad_norms.append(row["grad_norm"])
            print(f"{args.method} step {len(losses)}: loss {row['loss']:.4f} grad_norm {row['grad_norm']:.3f} "
                  f"{seconds[-1]:.3f}s", flush=True)
    for w in seen:  # shown once each, and kept: a checkpointing or dtype warning belongs in the record
        text = f"{w.category.__name__}: {str(w.message).splitlines()[0][:200]}"
        if text not in caught:
            caught.append(text)
            print(f"warning: {text}", file=sys.stderr, flush=True)

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    dtypes: dict[str, int] = {}
    for p in base.parameters():
        key = type(p).__name__ + ":" + str(p.dtype).replace("torch.", "")
        dtypes[key] = dtypes.get(key, 0) + p.numel()
    timed = seconds[1:] if len(seconds) > 1 else seconds  # the first step carries warm-up work
    name = torch.cuda.get_device_name() if cuda else "cpu"
    rec = {
        "bench": "methods_memory",
        "method": args.method,
        "model": MODEL_NAME if args.shape_tag == "1b" else f"llama-{args.shape_tag}-random",
        "device": name,
        "micro_batch": args.micro, "seq_len": args.seq,
        "trained_tokens_per_step": args.micro * (args.seq - args.seq // 2),
        "steps": args.steps, "lora_r": mcfg.r, "lora_alpha": mcfg.alpha, "target_modules": mcfg.target_modules,
        "quant": "nf4+double_quant, bf16 compute" if args.method == "qlora" else None,
        "gradient_checkpointing": True,
        "params": {"trainable": trainable, "total": total},
        "losses": [round(x, 4) for x in losses],
        "grad_norms": [round(x, 4) for x in grad_norms],
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3) if cuda else None,
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 3) if cuda else None,
        "weights_after_load_gib": mem.get("weights_after_load_gib"),
        "after_apply_gib": mem.get("after_apply_gib"),
        "load_seconds": round(load_s, 2),
        "seconds_per_step": round(sum(timed) / len(timed), 4),
        "seconds_per_step_all": [round(x, 4) for x in seconds],
        "base_param_dtypes": dtypes,
        "warnings": caught,
        "versions": versions(),
        "date": args.date,
    }
    if not all(math.isfinite(x) for x in losses):
        rec["error"] = "non-finite loss"
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--make", metavar="DIR", help="build the random-init model into DIR and exit")
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES), help="with --make: model shape (default 1b)")
    ap.add_argument("--method", choices=("lora", "qlora"))
    ap.add_argument("--model", metavar="DIR", help="the model folder --make wrote")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--micro", type=int, default=4, help="records per micro-batch (one micro-batch a step)")
    ap.add_argument("--seq", type=int, default=512, help="tokens per record; the first half is masked prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: logic check of lora only")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--results", action="append", default=[], metavar="FILE",
                    help="also append the JSON line here (repeatable); bench/results/<date>-<device>.jsonl "
                         "always gets it on CUDA")
    args = ap.parse_args(argv)
    if args.make:
        make(Path(args.make), args.shape, args.seed)
        return 0
    if not args.method or not args.model:
        ap.error("give --make DIR, or --method lora|qlora and --model DIR")
    if args.device == "cpu" and args.method == "qlora":
        ap.error("qlora needs CUDA (bitsandbytes); --device cpu checks the lora path only")
    path = Path(args.model) / "config.json"
    cfg = json.loads(path.read_text()) if path.is_file() else {}
    args.shape_tag = "1b" if cfg.get("hidden_size") == 2048 and cfg.get("num_hidden_layers") == 16 else "tiny"
    rec = train(args)
    line = json.dumps(rec)
    print(line, flush=True)
    targets = [Path(p) for p in args.results]
    if args.device == "cuda":
        targets.insert(0, ROOT / "bench" / "results" / f"{args.date}-{device_tag(rec['device'])}.jsonl")
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return 1 if "error" in rec else 0


if __name__ == "__main__":
    sys.exit(main())
