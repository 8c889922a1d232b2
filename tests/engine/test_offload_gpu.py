"""train.offload_activations on a GPU (engine/offload.py): the checkpointed layers' inputs go to pinned CPU
memory on a side stream and come back in backward with bit-identical gradients, and the peak falls by about
their size. For the GPU session (`bash bench/gpu.sh offload-test` runs it on the device)."""
from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from slimtune import config, methods
from slimtune.data.encode import Encoded
from slimtune.engine import precision
from slimtune.engine.loop import accumulate, collate_micro
from slimtune.engine.offload import OffloadActivations
from slimtune.kernels import attention, lora

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="offload to pinned memory needs CUDA; "
                                "the CPU checks of what is moved are tests/engine/test_offload.py")
LAYERS, HIDDEN, TOKENS = 8, 1024, 8192


def _run(offload: bool):
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=4096, hidden_size=HIDDEN, intermediate_size=2816,
                               num_hidden_layers=LAYERS, num_attention_heads=16, num_key_value_heads=4,
                               max_position_embeddings=TOKENS, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).to("cuda", torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(1)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = methods.apply(model, config.MethodConfig(name="lora", r=16, alpha=32, target_modules=targets))
    precision.cast_trainable(model, torch.float32)
    attention.enable(model)
    lora.enable(model)
    model.train()
    g = torch.Generator().manual_seed(2)
    records = [Encoded(torch.randint(0, 4096, (n,), generator=g).tolist(), [-100] * 20 +
                       torch.randint(0, 4096, (n - 20,), generator=g).tolist()) for n in (3000, 2500, 1692, 1000)]
    batch = collate_micro(records, True, 0, "cuda")
    plan = precision.choose_dtypes("bf16", "cuda")
    hooks = OffloadActivations(model)

    def context():  # as loop.forward_context builds it, with the hooks at hand
        stack = contextlib.ExitStack()
        stack.enter_context(precision.autocast(plan, "cuda"))
        if offload:
            stack.enter_context(hooks)
        return stack
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss, _ = accumulate(model, [batch], context, chunked=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss, grads, peak, hooks


def test_offloaded_layer_inputs_same_gradients_lower_peak():
    loss0, ref, peak0, _ = _run(False)
    _, again, _, _ = _run(False)  # attention's backward adds in a varying order: the gradients' own noise
    loss1, got, peak1, hooks = _run(True)
    moved = hooks.moved
    assert loss1 == loss0  # the forward is deterministic: the same values went in
    assert ref.keys() == got.keys()
    rel = lambda a, k: float((a[k] - ref[k]).norm() / ref[k].norm().clamp_min(1e-30))  # noqa: E731
    noise = max(rel(again, k) for k in ref)
    worst = max(rel(got, k) for k in ref)
    print(f"gradients: relative difference with offload {worst:.2e}, between two plain runs {noise:.2e}")
    assert worst <= 3 * noise + 1e-6
    layer_input = TOKENS * HIDDEN * 2
    # every layer's input (bf16) and the final norm's (its fp32 copy); small or weight tensors stay
    assert sum(n == layer_input for s, n in moved if s == (1, TOKENS, HIDDEN)) == LAYERS
    saved = peak0 - peak1
    print(f"peak {peak0 / 2**20:.0f} -> {peak1 / 2**20:.0f} MiB (-{saved / 2**20:.0f}); layer input "
          f"{layer_input / 2**20:.0f} MiB x {LAYERS}; moved {len(moved)} tensors")
    assert saved >= 0.8 * (LAYERS - 1) * layer_input
    assert hooks.early == len(moved) - 1  # all but the first read back came from a copy started ahead of it
