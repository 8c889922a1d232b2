"""The importance-matrix quantizers (Q4_0/Q5_0 scale search, Q4_K/Q6_K weights) read back by `gguf.quants`,
the activation statistics behind them, and `slimtune export --imatrix`."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from conftest import CORPUS, write_jsonl
from slimtune import cli
from slimtune.export import imatrix as imatrix_mod
from slimtune.export.quants import block_weights, encode, quantize_legacy, quantize_q4_k, quantize_q6_k

LEGACY = {T.Q4_0: "q4_0", T.Q5_0: "q5_0"}
BLOCK_BYTES = {T.Q4_0: 18, T.Q5_0: 22}  # ggml-common.h: block_q4_0 (f16 d, 16 bytes), block_q5_0 (+4 bytes qh)


def weighted_error(x, y, w) -> float:
    return float((w * (x - y) ** 2).sum())


def matrix(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian weights with a few outliers, as trained matrices have (the absmax scale suffers most there)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32) * 0.05
    x[rng.random((rows, cols)) < 0.01] *= 6
    return x


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0], ids=["q4_0", "q5_0"])
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (33, 576)])
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["uniform", "imatrix"])
def test_weighted_error_not_above_the_absmax_quantizer(qtype, shape, with_imatrix):
    """Read back by gguf's own dequantizer: never a larger weighted error than gguf.quants' absmax scale, and
    on the whole matrix at least 3% smaller (measured 4-12%: ratios 0.876-0.958 over these cases)."""
    x = matrix(*shape, seed=shape[0])
    columns = np.random.default_rng(9).uniform(0.05, 4.0, shape[1]).astype(np.float32) if with_imatrix else None
    ours, theirs = quantize_legacy(x, LEGACY[qtype], columns), quants.quantize(x, qtype)
    assert ours.dtype == theirs.dtype == np.uint8 and ours.shape == theirs.shape == \
        (shape[0], shape[1] // 32 * BLOCK_BYTES[qtype])
    w = block_weights(x, columns)
    got, ref = quants.dequantize(ours, qtype), quants.dequantize(theirs, qtype)
    per_block = [(w * (x - y) ** 2).reshape(-1, 32).sum(axis=1) for y in (got, ref)]
    assert np.all(per_block[0] <= per_block[1] * (1 + 1e-6))
    if shape[0] > 1:
        assert weighted_error(x, got, w) <= 0.97 * weighted_error(x, ref, w)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q5_0], ids=["q4_0", "q5_0"])
def test_layout_exact_values_come_back_exactly(qtype):
    """A block that is d * integer codes (both ends of the code range present) decodes bit for bit: the
    f16 scale is in bytes 0-1 and each code lands at its own position."""
    nmax = 8 if qtype == T.Q4_0 else 16
    rng = np.random.default_rng(4)
    codes = rng.integers(-nmax, nmax, (5, 64)).astype(np.float32)
    codes[:, 0], codes[:, 33] = -nmax, nmax - 1
    x = codes * np.float32(0.125)
    packed = quantize_legacy(x, LEGACY[qtype])
    assert np.array_equal(quants.dequantize(packed, qtype), x)
    # |d| = 0.125; a block whose codes fit -(nmax-1)..nmax-1 may as well store -d and negated codes
    assert np.all(np.abs(packed.reshape(-1, BLOCK_BYTES[qtype])[:, :2].copy().view(np.float16)) == 0.125)
    zero = quantize_legacy(np.zeros((1, 32), np.float32), LEGACY[qtype])
    assert np.array_equal(quants.dequantize(zero, qtype), np.zeros((1, 32)))


def test_deterministic_and_encode_dispatches():
    x = matrix(9, 512, seed=3)
    columns = np.linspace(0.1, 2.0, 512, dtype=np.float32)
    for qtype in (T.Q4_0, T.Q5_0, T.Q4_K, T.Q6_K):
        a, b = encode(x, qtype, columns), encode(x.copy(), qtype, columns.copy())
        assert a.dtype == np.uint8 and np.array_equal(a, b)
    assert np.array_equal(encode(x, T.Q4_0, columns), quantize_legacy(x, "q4_0", columns))
    assert np.array_equal(encode(x, T.Q8_0), quants.quantize(x, T.Q8_0))  # Q8_0: gguf's own, as llama.cpp


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=["q4_k", "q6_k"])
def test_k_quants_with_an_imatrix_lower_the_weighted_error(qtype):
    """Columns weighted 1..100: the imatrix fit moves its error to where the weights are small. Measured
    weighted-error ratios 0.946 (Q4_K) and 0.966 (Q6_K: 6-bit codes leave the scale little to gain)."""
    x = matrix(7, 768, seed=5)
    columns = np.random.default_rng(6).uniform(1.0, 100.0, 768).astype(np.float32)
    quantize = quantize_q4_k if qtype == T.Q4_K else quantize_q6_k
    w = np.broadcast_to(columns, x.shape)
    plain, weighted = (quants.dequantize(quantize(x, c), qtype) for c in (None, columns))
    assert weighted_error(x, weighted, w) <= 0.98 * weighted_error(x, plain, w)


def test_collect_is_the_mean_squared_input_of_each_linear(tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batches = [tokenizer(t)["input_ids"] for t in CORPUS[:3]]
    columns, tokens = imatrix_mod.collect(model, batches)
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head.weight"}
    assert set(columns) == linears and tokens == sum(map(len, batches))
    layer = model.model.layers[0]
    with torch.no_grad():
        x = torch.cat([layer.input_layernorm(model.model.embed_tokens(torch.tensor(b))) for b in batches])
    want = (x.double() ** 2).mean(dim=0).numpy()
    assert np.allclose(columns["model.layers.0.self_attn.q_proj.weight"], want, rtol=1e-5)
    assert np.array_equal(columns["model.layers.0.self_attn.q_proj.weight"],
                          columns["model.layers.0.self_attn.v_proj.weight"])  # same input


def test_collect_squares_a_shared_input_once_with_the_same_sums(tokenizer, tiny_model_dir):
    """Linears fed the same tensor share one squared sum: every column equal, bit for bit, to a separate
    hook on each Linear (the first implementation), and each Linear's own input still its own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    batches = [tokenizer(t)["input_ids"] for t in CORPUS[:4]]
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(_m, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums[name] + (x * x).sum(dim=0) if name in sums else (x * x).sum(dim=0)
        return record

    hooks = [m.register_forward_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for ids in batches:
            model.base_model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    tokens = sum(map(len, batches))
    columns, counted = imatrix_mod.collect(model, batches)
    assert counted == tokens and set(columns) == set(sums)
    for name, total in sums.items():
        assert np.array_equal(columns[name], (total / tokens).float().numpy()), name
    first = "model.layers.0."
    assert not np.array_equal(columns[first + "self_attn.o_proj.weight"], columns[first + "self_attn.q_proj.weight"])
    assert not np.array_equal(columns[first + "mlp.down_proj.weight"], columns[first + "mlp.up_proj.weight"])


def test_export_says_what_it_used_and_off_turns_it_off(tokenizer, tiny_model_dir, tmp_path, capsys):
    rows = [{"instruction": t, "output": t[::-1]} for t in CORPUS]
    data = write_jsonl(tmp_path / "calib.jsonl", rows)
    outs = {}
    for choice in (str(data), "off"):
        path = tmp_path / f"m-{len(outs)}.gguf"
        assert cli.main(["export", str(tiny_model_dir), "--output", str(path), "--quant", "q4_0",
                         "--imatrix", choice]) == 0
        outs[choice] = path.read_bytes()
    out = capsys.readouterr().out
    assert f"importance matrix from {len(rows)} records" in out and str(data) in out
    assert "no importance matrix (--imatrix off)" in out
    assert len(outs["off"]) == len(outs[str(data)]) and outs["off"] != outs[str(data)]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no instruction"}])
    with pytest.raises(Exception, match="bad.jsonl"):
        imatrix_mod.compute(tiny_model_dir, tokenizer, str(bad))


def test_calibration_reads_the_runs_training_data_and_says_when_it_cannot(tmp_path, monkeypatch):
    from slimtune import config as config_mod

    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(imatrix_mod.MAX_RECORDS + 5)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    run_cfg = config_mod.load(None, [f"data.train={data}", "data.template=llama3"])
    examples, cfg, source = imatrix_mod.calibration("auto", run_cfg)
    assert len(examples) == imatrix_mod.MAX_RECORDS and source == str(data) and cfg.data.template == "llama3"
    assert examples[3].messages[-1]["content"] == "3"
    monkeypatch.setenv("SLIMTUNE_CACHE", str(tmp_path / "empty-cache"))  # no demo data, and no download
    logged: list[str] = []
    gone = config_mod.load(None, [f"data.train={tmp_path / 'moved.jsonl'}"])
    assert imatrix_mod.calibration("auto", gone, logged.append)[0] == []
    assert "moved.jsonl is not here" in logged[0] and "without an importance matrix" in logged[1]
    assert not list((tmp_path / "empty-cache").rglob("*.tar.gz"))  # nothing was downloaded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compute() runs the model on the GPU in bf16 only there")
def test_bf16_on_the_gpu_matches_the_cpu_statistic(tokenizer, tiny_model_dir):
    """bf16 activations round each value to 8 bits of mantissa: their means of squares agree within 2%."""
    from transformers import AutoModelForCausalLM

    batches = [tokenizer(t)["input_ids"] for t in CORPUS[:3]]
    cpu, _ = imatrix_mod.collect(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), batches)
    gpu_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16).cuda().eval()
    gpu, _ = imatrix_mod.collect(gpu_model, batches)
    for name, want in cpu.items():
        assert np.allclose(gpu[name], want, rtol=2e-2, atol=1e-6), name
