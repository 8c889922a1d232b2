"""grpo.decode=compiled on a GPU (engine/decode.py): inductor with CUDA graphs draws the greedy tokens of
transformers' generate, reads the LoRA weights where the optimizer changes them, and once compiled (the first call)
decodes faster than the same static-cache loop run eagerly. The CPU checks are tests/engine/test_static_decode.py."""
from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from slimtune.config import MethodConfig
from slimtune.engine import decode
from slimtune.kernels import lora as fused_lora
from slimtune.methods import apply

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU; the CPU checks of "
                                "the same decoder are tests/engine/test_static_decode.py")
ROWS, PROMPT, NEW, VOCAB, PAD = 8, 24, 48, 2048, 0


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                               tie_word_embeddings=True, initializer_range=0.2)
    model = AutoModelForCausalLM.from_config(cfg).to("cuda")  # fp32: greedy ties are not settled by rounding
    model = apply(model, MethodConfig(name="lora", r=8, dropout=0.0, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    fused_lora.enable(model, log=lambda _: None)
    return model.eval()


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (ROWS, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for row in range(ROWS):  # left padding of 0 to 14 tokens
        mask[row, :2 * row] = 0
    return ids.masked_fill(mask == 0, PAD).cuda(), mask.cuda()


@torch.no_grad()
def _timed(decoder: decode.StaticDecoder, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, float]:
    torch.cuda.synchronize()
    began = time.perf_counter()
    out = decoder.generate(ids, mask, decode.Sampling(1.0, 1.0, NEW, (VOCAB + 1,), PAD, greedy=True))
    torch.cuda.synchronize()
    return out, time.perf_counter() - began


def test_compiled_decode_draws_generates_tokens_and_amortises_its_compile():
    model = _model()
    ids, mask = _prompts()
    gen = GenerationConfig(do_sample=False, max_new_tokens=NEW, eos_token_id=[VOCAB + 1], pad_token_id=PAD)
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, ids.shape[1]:]
    eager, compiled = decode.StaticDecoder(model, compiled=False), decode.StaticDecoder(model)
    first_out, first = _timed(compiled, ids, mask)
    (out, again), (eager_out, eager_s) = _timed(compiled, ids, mask), _timed(eager, ids, mask)
    print(f"decode of {ROWS} x {NEW} tokens: compiled first call {first:.2f} s, second {again * 1e3:.1f} ms; "
          f"static cache run eagerly {eager_s * 1e3:.1f} ms")
    assert compiled.failed is None
    assert torch.equal(first_out, want) and torch.equal(out, want) and torch.equal(eager_out, want)
    assert again < first / 5 and again < eager_s
    with torch.no_grad():  # an optimizer step's in-place update: the graphs read the adapter where it lives
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p), alpha=0.2)
        changed = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, ids.shape[1]:]
    out, _ = _timed(compiled, ids, mask)
    assert not torch.equal(changed, want) and torch.equal(out, changed)
