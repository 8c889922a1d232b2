"""Whether decoder layers compiled around QLoRA's fused 4-bit node train right on a GPU: the tiny Llama of
bench/check_offload_grads.py, in train mode (checkpointed, as fit runs it), its LoRA B weights set nonzero; for
lora and qlora, a base in bf16 or fp32, the LoRA gradients of compiled layers against the eager fused layers' on
the same batch.

    python bench/check_compiled_4bit.py [--out compiled_4bit.jsonl]

Prints per case the loss of each pass, how many gradients are all zeros, and the lowest cosine and the largest
relative difference of a gradient against eager's. lora's row is the yardstick: the same compile, no 4-bit node,
so what inductor's fusion of bf16 arithmetic alone moves.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from check_offload_grads import ALL, VOCAB, context_for, model_folder  # noqa: E402

from slimtune import config, prepare  # noqa: E402
from slimtune.data.encode import Encoded  # noqa: E402
from slimtune.engine.loop import accumulate, collate_micro  # noqa: E402


def load(folder: str, method: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if method == "qlora" else None
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, quantization_config=quant, device_map="cuda")


def grads_of(folder: str, method: str, dtype: torch.dtype, compile_mode: str, batch: dict) -> tuple[float, dict, int]:
    torch._dynamo.reset()
    cfg = config.Config()
    cfg.method = config.MethodConfig(name=method, r=8, alpha=16, dropout=0.0, target_modules=ALL)
    cfg.train = config.TrainConfig(gradient_checkpointing=True, precision="bf16", compile=compile_mode,
                                   fused_norm_mlp="off")
    prep = prepare(load(folder, method, dtype), cfg, "cuda", log=lambda *_: None, kernels=True)
    model = prep.model.train()
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    loss, _ = accumulate(model, [batch], context_for(prep.dtypes, None), chunked=True)
    torch.cuda.synchronize()
    grads = {n.split("layers.")[-1]: p.grad.float().clone() for n, p in model.named_parameters()
             if p.requires_grad and p.grad is not None}
    return float(loss), grads, prep.kernels.compiled_layers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="JSON lines, one per case")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_compiled_4bit: needs a CUDA GPU")
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    folder = model_folder()
    g = torch.Generator().manual_seed(2)
    records = [Encoded(torch.randint(0, VOCAB, (n,), generator=g).tolist(),
                       [-100] * 5 + torch.randint(0, VOCAB, (n - 5,), generator=g).tolist()) for n in (90, 61, 33)]
    batch = collate_micro(records, True, 0, "cuda")
    bad = False
    with open(args.out, "a") if args.out else contextlib.nullcontext() as out:
        for method in ("lora", "qlora"):
            for dtype in (torch.bfloat16, torch.float32):
                t0 = time.perf_counter()
                eager_loss, eager, _ = grads_of(folder, method, dtype, "off", batch)
                print(f"{method} {dtype}: eager in {time.perf_counter() - t0:.0f} s", flush=True)
                loss, got, n = grads_of(folder, method, dtype, "on", batch)
                print(f"{method} {dtype}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
                zeros = [k for k, v in got.items() if float(v.abs().max()) == 0]
                cos = {k: float(torch.nn.functional.cosine_similarity(v.flatten(), eager[k].flatten(), dim=0))
                       for k, v in got.items()}
                rel = {k: float((v - eager[k]).norm() / eager[k].norm().clamp_min(1e-30)) for k, v in got.items()}
                worst = min(cos, key=cos.get)
                row = dict(bench="compiled_4bit", method=method, base=str(dtype).split(".")[-1], compiled_layers=n,
                           eager_loss=eager_loss, compiled_loss=loss, zeros=len(zeros), n_grads=len(got),
                           min_cos=round(cos[worst], 5), worst=worst, max_rel=round(max(rel.values()), 5))
                print(json.dumps(row), flush=True)
                bad |= bool(zeros) or cos[worst] < 0.99
                if out is not None:
                    out.write(json.dumps(row) + "\n")
    return int(bad)


if __name__ == "__main__":
    sys.exit(main())
