"""Causal attention of one record, forward + backward, on one GPU: the varlen FlashAttention-2 kernel packed rows
take (slimtune.kernels.attention.varlen) beside torch's scaled_dot_product_attention with each backend it has.

A long record's step is mostly attention (8B at 131,072 tokens: about two thirds of its FLOPs), and SDPA's cuDNN
backend is reported 1.7-2.3x faster than FlashAttention-2 on Hopper for training shapes. This times each at the
8B shape (32 query heads, 8 key/value heads, head dim 128, bf16) over record lengths, and checks each output and
gradient against the varlen kernel's. A backend that refuses a shape (an error) is reported as such.

  python bench/attention_speed.py --lengths 1024,4096,16384,65536 --out /tmp/out/attention.jsonl

`python bench/run.py attention-speed ...` runs this script; stage `attention-speed` runs it on the device.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
HEADS, KV_HEADS, DIM = 32, 8, 128  # Llama-3.1-8B


def _sdpa(backend: str | None):
    """SDPA under one backend (None: torch's own choice), with the key/value heads as they are (enable_gqa)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v, cu, longest):
        if backend is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return run


def _varlen(q, k, v, cu, longest):
    from slimtune.kernels import attention
    return attention.varlen(q, k, v, cu, longest).transpose(1, 2)  # (1, T, H, D) -> (1, H, T, D)


KINDS = {"varlen (FlashAttention-2)": _varlen, "sdpa (torch's choice)": _sdpa(None),
         "sdpa cudnn": _sdpa("CUDNN_ATTENTION"), "sdpa flash": _sdpa("FLASH_ATTENTION"),
         "sdpa efficient": _sdpa("EFFICIENT_ATTENTION")}


def _inputs(length: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(1, h, length, DIM, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (HEADS, KV_HEADS, KV_HEADS))
    w = torch.randn(1, HEADS, length, DIM, generator=g, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, length], dtype=torch.int32, device="cuda")
    return q, k, v, w, cu


def _pass(fn, q, k, v, w, cu, length):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v, cu, length)
    (out.float() * w).sum().backward()
    return out, (q.grad, k.grad, v.grad)


def _flops(length: int) -> float:
    """Forward (two matmuls over half the scores: causal) and backward (2.5x the forward)."""
    return 4 * HEADS * DIM * length * length / 2 * 3.5


def measure(name: str, length: int, iters: int, want=None) -> dict:
    fn, row = KINDS[name], {"kind": name, "tokens": length}
    q, k, v, w, cu = _inputs(length)
    try:
        out, grads = _pass(fn, q, k, v, w, cu, length)
    except Exception as err:  # noqa: BLE001 - a backend that refuses this shape
        return dict(row, error=f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if want is not None:  # relative max difference against the varlen kernel's output and gradients
        row["max_rel_diff"] = max(float((a.float() - b.float()).abs().max() / b.float().abs().max())
                                  for a, b in zip((out, *grads), want))
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        _pass(fn, q, k, v, w, cu, length)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / iters
    return dict(row, ms=round(ms, 3), tflops=round(_flops(length) / ms / 1e9, 1), iters=iters,
                **({"result": (out.detach(), *(g.clone() for g in grads))} if want is None else {}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,16384,65536")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("attention_speed.py: no CUDA device")
    from slimtune.kernels import attention
    if "enable_gqa" not in attention._varlen_params():  # as attention.enable() decides it for a model
        attention.KERNEL_GQA = attention.check_kernel_gqa()
    choice = {}
    rows = []
    for length in (int(n) for n in a.lengths.split(",")):
        iters = max(2, min(50, int(2e15 / _flops(length))))  # about 2 PFLOP a kind: seconds, not minutes
        base = measure("varlen (FlashAttention-2)", length, iters)
        want = base.pop("result", None)
        rows.append(base)
        for name in (n for n in a.kinds.split(",") if n in KINDS and not n.startswith("varlen")):
            rows.append(measure(name, length, iters, want))
        q, k, v, _, _ = _inputs(length)
        try:  # the backend SDPA picks for this shape (torch's own index into SDPBackend)
            choice[length] = int(torch._fused_sdp_choice(q, k, v, is_causal=True, enable_gqa=True))
        except Exception as err:  # noqa: BLE001
            choice[length] = repr(err)[:100]
        del want
        torch.cuda.empty_cache()
    meta = dict(bench="attention_speed", date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                torch=torch.__version__, cudnn=torch.backends.cudnn.version(), heads=HEADS, kv_heads=KV_HEADS,
                dim=DIM, sdpa_choice=choice)
    print("| tokens | kind | ms (fwd+bwd) | TFLOP/s | max rel diff vs varlen |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']} | {r['kind']} | {r.get('ms', r.get('error', ''))} | {r.get('tflops', '')} | "
              f"{r.get('max_rel_diff', '')} |")
    print(json.dumps(meta))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(dict(meta, rows=rows)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
