"""The static-cache decoder (engine/decode.py) against transformers' generate on the tiny random Llama with a
LoRA adapter: the same tokens greedy and under a seed, one compile for every step and call, a LoRA weight changed
between calls reaches the compiled step, and the run's fast paths (fused LoRA, compiled layers, checkpointing,
offloaded activations) leave the tokens unchanged. The compiled step runs here through a backend that counts its
compiles and runs the traced graph as it is (no code generation); tests/engine/test_static_decode_gpu.py runs
inductor with CUDA graphs."""
from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig

from slimtune import fit
from slimtune.config import Config, MethodConfig
from slimtune.config.docs import explain
from slimtune.config.fields import GrpoConfig
from slimtune.data.prompts import PromptRecord, build_prompts
from slimtune.engine import decode, grpo_sample
from slimtune.engine.offload import OffloadActivations
from slimtune.engine.recompute import enable_checkpointing
from slimtune.kernels import compiled as compiled_layers
from slimtune.kernels import lora as fused_lora
from slimtune.methods import apply

from slimtune.runs.metrics_log import read_metrics

from conftest import make_model, write_jsonl

TEXTS = ["hello there", "The capital of France is", "1 2", "the quick brown fox jumps over"]
NEW = 12


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs each as traced."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def _model(tokenizer: object, **method: object) -> torch.nn.Module:
    model = apply(make_model(len(tokenizer)), MethodConfig(name="lora", r=4, target_modules=["q_proj", "v_proj"],
                                                           **method))
    torch.manual_seed(3)
    with torch.no_grad():  # a trained-looking adapter: lora_B starts at zero, which would hide it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model.eval()


def _prompts(tokenizer: object) -> tuple[torch.Tensor, torch.Tensor]:
    return grpo_sample.left_pad([tokenizer(t)["input_ids"] for t in TEXTS], tokenizer.pad_token_id, "cpu")


@torch.no_grad()
def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, stops: list[int], pad: int,
              sample: bool = False) -> torch.Tensor:
    gen = GenerationConfig(do_sample=sample, temperature=0.7 if sample else None, top_p=0.9 if sample else None,
                           top_k=0 if sample else None, max_new_tokens=NEW, eos_token_id=stops, pad_token_id=pad)
    return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)[:, ids.shape[1]:]


BACKEND = Counting()  # the module's compiled decoder's: a compile costs seconds on the CPU, made once here


@pytest.fixture(scope="module")
def compiled(tokenizer: object) -> decode.StaticDecoder:
    return decode.StaticDecoder(_model(tokenizer), backend=BACKEND)


def test_greedy_tokens_are_generates_with_rows_stopping_at_different_steps(tokenizer, compiled):
    model, pad = compiled.model, tokenizer.pad_token_id
    ids, mask = _prompts(tokenizer)
    free = _generate(model, ids, mask, [len(tokenizer) + 1], pad)  # a stop id no row draws: all NEW tokens
    assert free.shape == (4, NEW) and len({tuple(r) for r in free.tolist()}) == 4
    eager = decode.StaticDecoder(model, compiled=False)
    for stops in ([int(free[0, 2])], [int(free[i, 1 + i]) for i in range(4)]):
        want = _generate(model, ids, mask, stops, pad)
        assert want.shape[1] < NEW or stops[0] == int(free[0, 2])  # the second set ends every row early
        for decoder in (eager, compiled):
            with torch.no_grad():
                got = decoder.generate(ids, mask, decode.Sampling(1.0, 1.0, NEW, tuple(stops), pad, greedy=True))
            assert torch.equal(got, want), (stops, got, want)
    assert BACKEND.graphs == 1  # one graph for every decode step of both calls (same rows, same cache)


def test_seeded_samples_are_generates_through_grpo_sample(tokenizer, compiled):
    """sample() with the decoder draws what it draws with transformers' generate: one multinomial of every row per
    step, from the same temperature and top-p arithmetic, under the same seed. The 4 rows fit the cache the
    greedy test made: no new graph."""
    model = compiled.model
    records = [PromptRecord(tokenizer(t)["input_ids"], t, None, f"line {i}") for i, t in enumerate(TEXTS[1:2])]
    g = GrpoConfig(num_generations=4, max_new_tokens=NEW, temperature=0.7, top_p=0.9)
    stops = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for seed in (5, 6):
        want = grpo_sample.sample(model, records, g, tokenizer.pad_token_id, stops, "cpu", seed)
        got = grpo_sample.sample(model, records, g, tokenizer.pad_token_id, stops, "cpu", seed, decoder=compiled)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert len({tuple(r) for r in got["completion_ids"].tolist()}) > 1  # drawn, not one greedy answer
    assert BACKEND.graphs == 1


def test_a_changed_lora_weight_reaches_the_compiled_step_with_the_runs_fast_paths_on(tokenizer):
    """An optimizer step changes the adapter in place: the next call's tokens follow it, with no new compile. The
    model is prepared as a run prepares it: fused LoRA layers, compiled decoder layers, checkpointing, and the
    offload hooks around the forward."""
    model, pad = _model(tokenizer, dropout=0.0), tokenizer.pad_token_id
    assert fused_lora.enable(model, log=lambda _: None) == 4
    assert compiled_layers.enable(model, log=lambda _: None, backend="aot_eager") == 2
    assert enable_checkpointing(model, MethodConfig(name="lora"), log=lambda _: None)
    ids, mask = _prompts(tokenizer)
    backend, hooks = Counting(), OffloadActivations(model, min_bytes=0, device_type="cpu")
    decoder, s = decode.StaticDecoder(model, backend=backend), decode.Sampling(1.0, 1.0, NEW, (pad,), pad, True)
    before = []
    for _ in range(2):
        with torch.no_grad(), hooks:
            got = decoder.generate(ids, mask, s)
        assert torch.equal(got, _generate(model, ids, mask, [pad], pad)) and decoder.failed is None
        before.append(got)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn_like(p))
    assert not torch.equal(before[0], before[1]) and backend.graphs == 1


def test_decode_modes_and_their_config_key(tokenizer, monkeypatch):
    assert [decode.resolve(m, d) for m, d in [("auto", "cuda"), ("auto", "cuda:1"), ("auto", "cpu"),
                                              ("eager", "cuda"), ("compiled", "cpu")]] == \
        ["compiled", "compiled", "eager", "eager", "compiled"]
    model, said = _model(tokenizer), []
    assert decode.make(model, "auto", "cpu", 40, said.append) is None and said == []
    decoder = decode.make(model, "compiled", "cpu", 40, said.append)
    assert isinstance(decoder, decode.StaticDecoder) and decoder.length == 40 and "static KV cache" in said[0]
    prompt = apply(make_model(len(tokenizer)), MethodConfig(name="prompt_tuning", num_virtual_tokens=4))
    assert decode.make(prompt, "compiled", "cuda", 40, said.append) is None
    assert said[-1] == ("grpo.decode=compiled: sampling runs transformers' generate: PromptTuningConfig keeps its "
                        "virtual tokens in the KV cache")
    monkeypatch.setattr(decode, "sharded", lambda m: True)  # several processes: every one steps with the others
    assert decode.make(model, "compiled", "cuda", 40, said.append) is None
    assert said[-1] == ("grpo.decode=compiled: sampling runs transformers' generate: FSDP2 shards it, and every "
                        "process must take each decoding step together (generate's synced_gpus)")
    assert "  grpo.decode (str, default \"auto\"; one of: auto, eager, compiled)\n      how completions are " \
        "sampled: compiled (a static KV cache" in explain()


def test_a_grpo_run_with_the_compiled_decoder_logs_what_the_eager_one_does(tmp_path, tokenizer, monkeypatch):
    """fit with grpo.decode=compiled (the traced graph run as it is, for the CPU) samples, scores and trains to the
    numbers of grpo.decode=eager, and its log says the cache is kept through the training pass."""
    monkeypatch.setattr(decode, "BACKEND", "eager")
    cfg = Config()
    cfg.data.train = str(write_jsonl(tmp_path / "p.jsonl", [{"prompt": t} for t in TEXTS]))
    cfg.data.max_len, cfg.method = 64, MethodConfig(name="lora", r=4, target_modules=["q_proj", "v_proj"])
    cfg.train.objective, cfg.train.max_steps, cfg.train.device, cfg.train.precision = "grpo", 2, "cpu", "fp32"
    cfg.train.micro_batch_size, cfg.train.grad_accum, cfg.train.batch_size, cfg.train.lr = 2, 1, 2, 1e-2
    cfg.grpo.num_generations, cfg.grpo.max_new_tokens, cfg.grpo.rewards = 4, 6, []
    prompts = build_prompts(cfg.data, tokenizer, needs_answer=False, log=lambda m: None).train
    runs, said = [], []
    for mode in ("eager", "compiled"):
        cfg.grpo.decode = mode
        fit(_model(tokenizer).train(), prompts, cfg, out_dir=tmp_path / mode, tokenizer=tokenizer,
            rewards=[lambda p, c, a: [float(len(x)) for x in c]], pad_id=tokenizer.pad_token_id, log=said.append)
        runs.append([{k: v for k, v in r.items() if not k.endswith("_s") and k not in ("time", "rss_gib")}
                     for r in read_metrics(tmp_path / mode / "metrics.jsonl")])
    assert runs[0] == runs[1] and [r["step"] for r in runs[0]] == [1, 2] and runs[0][0]["completion_length"] > 1
    assert any(line.startswith("grpo.decode=compiled: sampling with a static KV cache of") for line in said)
    assert sum("KV cache 0.00 GiB (kept between steps)" in line for line in said) == 1
    assert not any("failed on the decode step" in line for line in said)


def test_a_step_that_does_not_compile_runs_eagerly_after_one_line(tokenizer, compiled):
    def broken(gm: torch.fx.GraphModule, inputs: list) -> object:
        raise RuntimeError("no kernel for this op\nsecond line")
    said, pad = [], tokenizer.pad_token_id
    decoder = decode.StaticDecoder(compiled.model, backend=broken, log=said.append)
    ids, mask = _prompts(tokenizer)
    for _ in range(2):
        with torch.no_grad():
            got = decoder.generate(ids, mask, decode.Sampling(1.0, 1.0, NEW, (pad,), pad, greedy=True))
        assert torch.equal(got, _generate(compiled.model, ids, mask, [pad], pad))
    assert said == ["fast path off: grpo.decode=compiled: torch.compile failed on the decode step (RuntimeError: no "
                    "kernel for this op); sampling runs the step eagerly (set grpo.decode=eager to skip it)"]
