"""Which pass gives a LoRA gradient of zeros on a GPU: a tiny Llama (2 layers, hidden 64) in bf16, set up as
tests/kernels/test_qlora.py's GPU case sets it up (loaded from a folder, quantized while loading for qlora,
slimtune.prepare with the fast paths), then three passes: fused LoRA, fused again, peft's layers after
lora.disable. Each case changes one thing from that test's: the method, activation offload (off; on, which on
this model moves nothing, every saved tensor being under 1 MiB; all, min_bytes=1, every saved tensor through the
reused pinned buffers and the side stream), train.compile (auto or off), the mode (eval: the loaded model as
the test leaves it, so its layers are not checkpointed; train: as fit runs it, checkpointed) and the batch (one
packed row, varlen attention, as the test's; or padded rows, transformers' SDPA).

    python bench/check_offload_grads.py [--budget-s 150] [--out offload_grads.jsonl]

Prints, per case and pass, the loss, how many of the 28 LoRA gradients are all zeros (and which), each layer's
LoRA-A gradient norms (q k v o gate up down), and the lowest cosine of each gradient against the first pass;
then the cases with zeros. One JSON line per pass goes to --out.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimtune import config, prepare  # noqa: E402
from slimtune.data.encode import Encoded  # noqa: E402
from slimtune.engine import precision  # noqa: E402
from slimtune.engine.loop import accumulate, collate_micro  # noqa: E402
from slimtune.engine.offload import OffloadActivations  # noqa: E402
from slimtune.kernels import lora  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 400
# the failing test's case first, then one change at a time from it, then a few together
TEST = dict(method="qlora", offload="on", compile="auto", mode="eval", packing="rows")
CHANGES = [{}, dict(offload="off"), dict(compile="off"), dict(packing="off"), dict(method="lora"), dict(mode="train"),
           dict(mode="train", offload="all"), dict(mode="train", offload="all", compile="off"),
           dict(method="lora", mode="train", offload="all"), dict(method="lora", offload="off"),
           dict(offload="off", compile="off", packing="off"), dict(method="lora", offload="off", compile="off"),
           dict(method="lora", offload="off", compile="off", packing="off")]
CASES = [dict(TEST, **c) for c in CHANGES]


def model_folder() -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               tie_word_embeddings=True, initializer_range=0.2)
    folder = tempfile.mkdtemp(prefix="offload-grads-")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    return folder


def load(folder: str, method: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16) if method == "qlora" else None
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quant,
                                                device_map="cuda")


def context_for(plan: precision.Dtypes, hooks: OffloadActivations | None) -> Callable[[], contextlib.ExitStack]:
    def context() -> contextlib.ExitStack:  # as engine/loop.forward_context builds it, the hooks at hand
        stack = contextlib.ExitStack()
        stack.enter_context(precision.autocast(plan, "cuda"))
        if hooks is not None:
            stack.enter_context(hooks)
        return stack
    return context


def run_case(folder: str, case: dict, batches: dict[str, dict], out) -> bool:
    """The three passes of one case, printed; whether any gave a gradient of zeros."""
    method, offload, compile_mode, mode = case["method"], case["offload"], case["compile"], case["mode"]
    batch = batches[case["packing"]]
    torch._dynamo.reset()  # each case compiles its own layers (the recompile limit is per code object)
    cfg = config.Config()
    cfg.method = config.MethodConfig(name=method, r=8, alpha=16, dropout=0.0, target_modules=ALL)
    cfg.train = config.TrainConfig(gradient_checkpointing=True, precision="bf16", offload_activations=offload != "off",
                                   compile=compile_mode)
    prep = prepare(load(folder, method), cfg, "cuda", log=lambda *_: None, kernels=True)
    model = prep.model
    if mode == "train":
        model.train()
    hooks = None if offload == "off" else OffloadActivations(model, min_bytes=1 if offload == "all" else 1 << 20)
    context = context_for(prep.dtypes, hooks)
    for name, p in model.named_parameters():  # B starts at 0: give it values so A's gradient is not zero
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    took = prep.kernels
    label = (" ".join(f"{k}={v}" for k, v in case.items()) + f" (compiled layers {took.compiled_layers}, fused "
             f"{took.fused_lora_layers}, attention {model.config._attn_implementation})")
    print(f"== {label}", flush=True)
    first, bad = None, False
    for pass_name in ("fused-1", "fused-2", "peft"):
        if pass_name == "peft":
            lora.disable(model)
        model.zero_grad(set_to_none=True)
        loss, _ = accumulate(model, [batch], context, chunked=True)
        torch.cuda.synchronize()
        grads = {n.split("layers.")[-1]: p.grad.float().clone() for n, p in model.named_parameters()
                 if p.requires_grad and p.grad is not None}
        first = first or grads
        zeros = [n.replace(".default.weight", "").replace("self_attn.", "").replace("mlp.", "")
                 for n, g in grads.items() if float(g.abs().max()) == 0]
        cos = min(float(torch.nn.functional.cosine_similarity(g.flatten(), first[n].flatten(), dim=0))
                  for n, g in grads.items())
        norms = {}
        for n, g in grads.items():
            if "lora_A" in n:
                norms.setdefault(n.split(".")[0], []).append(float(g.norm()))
        layers = " | ".join(f"L{k} " + " ".join(f"{v:.2e}" for v in vals) for k, vals in norms.items())
        moved = len(hooks.moved) if hooks is not None else 0
        print(f"  {pass_name:8s} loss {float(loss):.5f} moved {moved:3d} zeros {len(zeros)}/{len(grads)} "
              f"{' '.join(zeros)} min cos vs fused-1 {cos:.4f}\n    A norms {layers}", flush=True)
        bad = bad or bool(zeros)
        if out is not None:
            out.write(json.dumps(dict(bench="offload_grads", case=label, pass_=pass_name, loss=float(loss),
                                      zeros=zeros, n_grads=len(grads), min_cos=cos, a_norms=norms, moved=moved))
                      + "\n")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget-s", type=float, default=150.0, help="start no new case after this many seconds")
    ap.add_argument("--out", help="JSON lines, one per pass")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_offload_grads: needs a CUDA GPU (the CPU checks are tests/engine/test_offload_grads.py)")
        return 2
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    folder, start = model_folder(), time.perf_counter()
    g = torch.Generator().manual_seed(2)
    records = [Encoded(torch.randint(0, VOCAB, (n,), generator=g).tolist(),
                       [-100] * 5 + torch.randint(0, VOCAB, (n - 5,), generator=g).tolist()) for n in (90, 61, 33)]
    # one packed row, as the test's (varlen attention); or padded rows (transformers' SDPA with a mask)
    batches = {"rows": collate_micro(records, True, 0, "cuda"), "off": collate_micro(records, False, 0, "cuda")}
    zeros = []
    with open(args.out, "a") if args.out else contextlib.nullcontext() as out:
        for case in CASES:
            if time.perf_counter() - start > args.budget_s:
                print(f"budget spent: {CASES.index(case)} of {len(CASES)} cases ran")
                break
            try:
                if run_case(folder, case, batches, out):
                    zeros.append(case)
            except Exception as err:  # one case's failure (a compile error) is itself a finding; go on
                print(f"  failed: {type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}")
    print("cases with a gradient of zeros: " + ("; ".join(" ".join(f"{k}={v}" for k, v in c.items()) for c in zeros)
                                                 if zeros else "none"))
    return 1 if zeros else 0


if __name__ == "__main__":
    sys.exit(main())
