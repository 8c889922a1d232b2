"""QLoRA's fused layer (kernels/qlora.py) against peft's lora.bnb.Linear4bit over bitsandbytes' 4-bit base:
outputs and every gradient, on the CPU (bitsandbytes >= 0.49 quantizes and dequantizes NF4 there) and under
bf16 autocast on a GPU; reference.dequantize_nf4 against bitsandbytes; the node alone against the formula."""
from __future__ import annotations

import pytest
import torch

from conftest import make_model
from lora_checks import ALL, VOCAB, assert_fused_equals_peft, lora_model, loss_and_grads
from slimtune import methods
from slimtune.config import MethodConfig, TrainConfig
from slimtune.kernels import compiled, lora, qlora, reference, select

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes (the test extra) quantizes the 4-bit base")
bnbf = pytest.importorskip("bitsandbytes.functional")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes' CUDA kernels and bf16 autocast: GPU")


def quantize(model, device="cpu", compute=torch.float32):
    """What transformers' BitsAndBytesConfig(load_in_4bit, nf4, double quant) does while loading: every
    projection of the decoder layers becomes a bitsandbytes Linear4bit (the head and embedding stay)."""
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if name not in ALL:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=compute, quant_type="nf4", compress_statistics=True)
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data.clone())
                setattr(parent, name, q.to(device))  # .to() quantizes the weight
    model.is_loaded_in_4bit = True  # peft wraps Linear4bit in its lora.bnb.Linear4bit only then
    return model.to(device)


def _model(arch="llama", device="cpu", compute=torch.float32, **kw):
    return lora_model(arch, base=quantize(make_model(VOCAB, arch), device, compute), **{"name": "qlora", **kw})


def _bnb_dequantize(packed, state):
    """bitsandbytes' own dequantization in the layout its quantizer and its CUDA kernel use: absmax through its
    public dequantize_blockwise (+ offset when nested), codes x absmax over flat blocks by its generic kernel.
    Not bnbf.dequantize_4bit on the CPU: bitsandbytes 0.50.0-0.50.2's C++ CPU kernel, taken where the last dim
    is even and the machine has AVX512, reads the blocks of a (64, 96) weight wrongly (max |error| 1.87 against
    the weight it quantized, vs 0.51 for the flat layout), so a test against it passes or fails by the CPU."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code
    absmax = state.absmax
    if state.nested:
        absmax = bnbf.dequantize_blockwise(absmax, state.state2) + state.offset
    code = _get_4bit_code(state.quant_type, packed.device)
    return _dequantize_4bit_compute(packed.view(torch.uint8).reshape(-1), absmax.float(), code, state.blocksize,
                                    state.shape, state.dtype)


@pytest.mark.parametrize("shape, dtype, nested", [((64, 96), torch.float32, True), ((7, 123), torch.bfloat16, True),
                                                  ((431, 33), torch.float32, False), ((64, 96), torch.float32, False)])
def test_reference_dequantize_is_bitsandbytes_bit_for_bit(shape, dtype, nested):
    """Odd sizes: the last block is partial and a byte's two codes can straddle rows."""
    w = torch.randn(*shape, dtype=dtype, generator=torch.Generator().manual_seed(3))
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
    got = reference.dequantize_nf4(packed, state)
    assert got.dtype == dtype and got.shape == shape
    assert torch.equal(got, _bnb_dequantize(packed, state))
    # independent of bitsandbytes' dequantizer: each value is within half of NF4's widest code gap (0.3038 / 2,
    # between -1 and -0.6962) of the weight, in units of its block's absmax (+2% for a nested absmax, an 8-bit copy)
    flat_w = w.float().reshape(-1)
    block_max = torch.nn.functional.pad(flat_w, (0, -flat_w.numel() % 64)).reshape(-1, 64).abs().amax(1)
    bound = float(state.code.diff().max()) / 2 * 1.02 * block_max.repeat_interleave(64)[: flat_w.numel()] + 1e-2
    assert bool(((got.float().reshape(-1) - flat_w).abs() <= bound).all())
    assert 0.05 < float((got.float() - w.float()).abs().max()) < 1.0  # 4 bits: a coarse copy, not w itself


@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_parts_is_bitsandbytes_dequantize_4bit(nested):
    """The node's dequantization from tensors and constants (what dynamo traces) is bitsandbytes' own, bit for bit."""
    w = torch.randn(48, 80, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(5))
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=nested)
    tensors, meta = qlora.parts(state)
    assert (tensors[1] is not None) is nested and meta == (64, 256 if nested else 0, "nf4", (48, 80), torch.bfloat16)
    got = qlora.dequantize_parts(packed, *tensors, meta)
    assert got.dtype == torch.bfloat16 and torch.equal(got, bnbf.dequantize_4bit(packed, state))


@pytest.mark.parametrize("bias", [False, True])
def test_node_alone_equals_the_reference_formula(bias, monkeypatch):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(23, 40, generator=g)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    wq = reference.dequantize_nf4(packed, state)
    monkeypatch.setattr(qlora, "dequantize_parts", lambda q, *parts: reference.dequantize_nf4(q, state))
    x = torch.randn(3, 5, 40, generator=g, requires_grad=True)
    a = torch.randn(4, 40, generator=g, requires_grad=True)
    b = torch.randn(23, 4, generator=g, requires_grad=True)
    bvec = torch.randn(23, generator=g, requires_grad=True) if bias else None
    out = qlora.lora_4bit_linear(x, packed, state, bvec, a, b, 0.5)
    want = reference.lora_linear(x, wq, bvec, a, b, 0.5)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # fp32: only the summation order differs
    grad = torch.randn_like(out)
    inputs = (x, a, b) + ((bvec,) if bias else ())
    for got, ref in zip(torch.autograd.grad(out, inputs, grad), torch.autograd.grad(want, inputs, grad)):
        assert float(ref.abs().max()) > 0
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("arch, bias, n_bias", [("llama", "none", 0), ("qwen2", "all", 6)])
def test_fused_equals_peft_bnb_layer_in_fp32(arch, bias, n_bias):
    """qwen2 has q/k/v biases: with bias=all they train through the node's bias gradient."""
    model = _model(arch, bias=bias)
    kinds = {type(m).__module__ + "." + type(m).__name__ for m in model.modules() if hasattr(m, "lora_A")}
    assert kinds == {"peft.tuners.lora.bnb.Linear4bit"}
    assert_fused_equals_peft(model, n_bias, grad_share=1e-5)


def test_the_node_saves_x_not_the_dequantized_weight():
    """What forward leaves for backward: x (N, in) and x A^T (N, r), the packed weight, A and B; no (out, in)
    tensor in a 16/32-bit dtype."""
    model = _model()
    lora.enable(model)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer = model.base_model.model.model.layers[0].mlp.up_proj
        layer(torch.randn(2, 9, 64))
    shapes = sorted(tuple(t.shape) for t in saved)
    assert (128, 64) not in shapes and (64, 128) not in shapes
    assert (18, 64) in shapes and (18, 4) in shapes


def test_what_cannot_be_fused_says_why_once():
    lines = []
    model = _model(dropout=0.1)
    assert lora.enable(model, lines.append) == 0
    assert lines == ["fused LoRA layers: 14 of 14 stay peft's: LoRA dropout 0.1 (set method.dropout=0 to fuse)"]
    model = _model(name="dora")
    assert lora.enable(model, lines.append) == 0 and "DoRA" in lines[-1]


def test_an_8bit_base_stays_peft_s_and_says_so():
    """bitsandbytes' 8-bit layers keep their own matmul (LLM.int8 outlier handling): peft's layer runs them,
    while the plain Linear layers beside them are fused."""
    model = make_model(VOCAB)
    for layer in model.model.layers:
        lin = layer.mlp.up_proj
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        layer.mlp.up_proj = q.to("cpu")  # .to() quantizes to int8
    model.is_loaded_in_8bit = True
    model = methods.apply(model, MethodConfig(name="qlora", quant_bits=8, r=4, alpha=8, dropout=0.0,
                                              target_modules=["up_proj", "q_proj"]))
    lines = []
    assert lora.enable(model, lines.append) == 2  # the two q_proj
    assert lines == ["fused LoRA layers: 2 of 4 stay peft's: a Linear8bitLt base (fused: nn.Linear and "
                     "bitsandbytes 4-bit; 8-bit is not)"]


def test_select_takes_qlora_layers_and_its_gpu_record_is_the_fast_engine():
    model = _model()
    try:
        took = select.enable(model, TrainConfig(fused_lora="on", loss="chunked"), "cpu")
        assert took.fused_lora_layers == 14 and took.chunked_loss
    finally:
        select.disable(model)
    assert lora.enabled(model) == 0
    from slimtune import config
    cfg = config.Config()
    cfg.method = config.MethodConfig(name="qlora", dropout=0.0)
    assert select.on_gpu(cfg) == select.Kernels(packing="rows", chunked_loss=True, fused_lora_layers=1)
    assert select.on_gpu(cfg).fast
    cfg.method = config.MethodConfig(name="qlora", dropout=0.0, quant_bits=8)  # peft's Linear8bitLt: not fused
    assert select.on_gpu(cfg).fused_lora_layers == 0


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_node_traces_into_compiled_code_with_the_eager_gradients(_fresh_dynamo, monkeypatch):
    """Its inputs tensors and constants, dynamo traces the 4-bit node (forward's dequantization and backward's run
    while compiling) and the compiled function's gradients are the eager call's."""
    g = torch.Generator().manual_seed(0)
    packed, state = bnbf.quantize_4bit(torch.randn(32, 64, generator=g), quant_type="nf4", compress_statistics=True)
    x = torch.randn(2, 5, 64, generator=g, requires_grad=True)
    a = torch.randn(4, 64, generator=g, requires_grad=True)
    b = torch.randn(32, 4, generator=g, requires_grad=True)
    compiling = []

    def dequant(q, *parts):
        compiling.append(torch.compiler.is_compiling())
        return reference.dequantize_nf4(q, state)
    monkeypatch.setattr(qlora, "dequantize_parts", dequant)

    def f(x, a, b):
        return (qlora.lora_4bit_linear(x * 2, packed, state, None, a, b, 2.0) + 1).square().sum()

    want = torch.autograd.grad(f(x, a, b), (x, a, b))
    compiling.clear()
    got = torch.autograd.grad(torch.compile(f, backend="aot_eager", dynamic=True)(x, a, b), (x, a, b))
    assert True in compiling  # traced, not run beside the graph
    for gg, ww in zip(got, want):
        assert float(ww.abs().max()) > 0
        torch.testing.assert_close(gg, ww, rtol=1e-6, atol=1e-6)


def test_compiled_layers_over_a_4bit_base_one_graph_and_the_eager_gradients(_fresh_dynamo, monkeypatch):
    """train.compile=on: the decoder layers over the 4-bit base compile with the fused node inside: one graph for
    every layer (two: the first layer's input needs no gradient) over two lengths, and every LoRA gradient the
    eager layers' (aot_eager, fp32)."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")

    def grads(compile_mode):
        torch._dynamo.reset()
        model = lora_model(base=quantize(make_model(VOCAB)), name="qlora").train()
        tc = TrainConfig(compile=compile_mode, packing="off", fused_lora="on", fused_norm_mlp="off", tiled_mlp="off")
        took = select.enable(model, tc, "cpu", lambda *_: None)
        counters.clear()
        try:
            assert took.fused_lora_layers == 14 and took.compiled_layers == (2 if compile_mode == "on" else 0)
            for length in (9, 21):
                ids = torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(length))
                model(input_ids=ids, use_cache=False).logits.float().square().mean().backward()
            return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, \
                counters["stats"]["unique_graphs"]
        finally:
            select.disable(model)
    want, _ = grads("off")
    got, graphs = grads("on")
    assert graphs == 2 and len(got) == len(want) == 28
    for name in want:
        assert float(want[name].abs().max()) > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


@CUDA
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_equals_peft_bnb_layer_on_gpu_under_bf16_autocast(arch):
    """bitsandbytes' CUDA dequantize; both paths compute in bf16, so they differ by bf16 rounding of the sums."""
    model = _model(arch, device="cuda", compute=torch.bfloat16, bias="all" if arch == "qwen2" else "none")
    ids = torch.randint(0, VOCAB, (2, 61), generator=torch.Generator().manual_seed(0)).cuda()
    want = loss_and_grads(model, ids, autocast=True)
    assert lora.enable(model) == 14
    got = loss_and_grads(model, ids, autocast=True)
    assert abs(float(got[0] - want[0])) < 1e-2 * float(want[0])  # bf16: 8 bits of mantissa over two layers
    for name, g in got[2].items():  # each gradient in its parameter's dtype, as peft's (a bf16 base's bias: bf16)
        assert g.dtype == want[2][name].dtype, name
        cos = torch.nn.functional.cosine_similarity(g.flatten(), want[2][name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


@CUDA
@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_fused_layers_in_compiled_decoder_layers_match_peft_on_gpu(base_dtype, _fresh_dynamo):
    """train.compile=auto on CUDA around the fused 4-bit layers, the base loaded in fp32 or bf16: the layers
    compile with the node traced inside by inductor, and every LoRA gradient is nonzero, the eager fused layers'
    and peft's up to bf16 rounding (a traced output that was a view gave all-zero gradients on an H200)."""
    base = quantize(make_model(VOCAB).to(base_dtype), "cuda", torch.bfloat16)
    model = lora_model(base=base, name="qlora")
    ids = torch.randint(0, VOCAB, (2, 61), generator=torch.Generator().manual_seed(0)).cuda()
    peft = loss_and_grads(model, ids, autocast=True)
    assert lora.enable(model) == 14
    eager = loss_and_grads(model, ids, autocast=True)
    lora.disable(model)
    tc = TrainConfig(fused_lora="on", compile="auto", fused_norm_mlp="off", packing="off", tiled_mlp="off")
    try:
        took = select.enable(model, tc, "cuda", log=lambda *_: None)
        assert took.fused_lora_layers == 14 and took.compiled_layers == 2
        got = loss_and_grads(model, ids, autocast=True)
    finally:
        select.disable(model)
    assert abs(float(got[0] - peft[0])) < 1e-2 * float(peft[0])
    assert got[2].keys() == peft[2].keys() and len(got[2]) == 28
    for name, g in got[2].items():
        assert float(g.abs().max()) > 0, name
        for want, least in ((eager, 0.999), (peft, 0.99)):
            cos = torch.nn.functional.cosine_similarity(g.flatten(), want[2][name].flatten(), dim=0)
            assert cos > least, (name, least, float(cos))


@CUDA
def test_node_on_gpu_matches_the_reference_in_bf16_and_frees_the_weight():
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(4096, 1024, device="cuda", generator=g, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    x = torch.randn(512, 1024, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(16, 1024, device="cuda", generator=g, requires_grad=True)
    b = torch.randn(4096, 16, device="cuda", generator=g, requires_grad=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    out = qlora.lora_4bit_linear(x, packed, state, None, a, b, 2.0)
    kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
    assert kept < w.numel() * w.element_size() / 2  # saved: x and x A^T, never the bf16 weight (8 MiB)
    want = reference.lora_linear(x.float(), reference.dequantize_nf4(packed, state).float(), None, a, b, 2.0)
    grad = torch.randn_like(out)
    got_g = torch.autograd.grad(out, (x, a, b), grad)
    ref_g = torch.autograd.grad(want, (x, a, b), grad.float())
    assert float((out.float() - want).abs().max()) < 2e-2 * float(want.abs().max())  # bf16 inputs and sums
    for got, ref in zip(got_g, ref_g):
        cos = torch.nn.functional.cosine_similarity(got.float().flatten(), ref.flatten(), dim=0)
        assert cos > 0.999, float(cos)


ON_CPU = dict(precision="fp32", packing="rows", loss="chunked", fused_lora="on")  # what auto takes on CUDA
ON_GPU = dict(precision="bf16", offload_activations=True)  # the defaults, activations offloaded


@pytest.mark.parametrize("device, train", [("cpu", ON_CPU), pytest.param("cuda", ON_GPU, marks=CUDA)])
def test_qlora_as_train_loads_it_takes_the_fast_paths_with_peft_s_loss_and_gradients(tiny_model_dir, device, train):
    """transformers quantizes while loading (nf4, double quant), slimtune.prepare switches the fast paths on:
    packed rows, chunked loss and fused LoRA layers are all taken, and one checkpointed step (offloaded on the
    GPU) gives peft's loss and gradients: within fp32 rounding on the CPU, bf16's on the GPU."""
    from transformers import BitsAndBytesConfig

    from slimtune import config, models, prepare
    from slimtune.data.encode import Encoded
    from slimtune.engine.loop import accumulate, collate_micro, forward_context

    cfg = config.Config()
    cfg.method = MethodConfig(name="qlora", r=8, alpha=16, dropout=0.0, target_modules=ALL)
    cfg.train = TrainConfig(gradient_checkpointing=True, **train)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)  # methods/quant.py's, which refuses the CPU
    model, tok = models.load(str(tiny_model_dir), "fp32" if device == "cpu" else "bf16", device=device,
                             quantization=quant)
    prep = prepare(model, cfg, device, log=lambda *_: None, kernels=True)
    took = prep.kernels
    assert took.fused_lora_layers == 14 and took.packing == "rows" and took.chunked_loss and took.fast
    g = torch.Generator().manual_seed(2)
    records = [Encoded(torch.randint(0, len(tok), (n,), generator=g).tolist(),
                       [-100] * 5 + torch.randint(0, len(tok), (n - 5,), generator=g).tolist()) for n in (90, 61, 33)]
    batch = collate_micro(records, True, 0, device)
    context = forward_context(prep.dtypes, device, cfg.train.offload_activations, prep.model)

    def run():
        prep.model.zero_grad(set_to_none=True)
        loss, _ = accumulate(prep.model, [batch], context, chunked=True)
        return float(loss), {n: p.grad.float().clone() for n, p in prep.model.named_parameters() if p.requires_grad}

    for name, p in prep.model.named_parameters():  # B starts at 0: give it values so A's gradient is not zero
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    loss_fused, fused = run()
    lora.disable(prep.model)
    # bitsandbytes multiplies an input that needs no gradient (the first layer's: slimtune leaves the frozen
    # embedding's output so) with its inference kernel, whose CPU fallback rounds otherwise (3e-4 of the loss):
    # the reference is peft's layers as peft trains them, the embedding output requiring grad
    prep.model.get_base_model().enable_input_require_grads()
    loss_peft, ref = run()
    assert fused.keys() == ref.keys() and len(fused) == 28
    if device == "cpu":  # the same fp32 arithmetic in another order
        assert abs(loss_fused - loss_peft) < 1e-5 * abs(loss_peft)
        for name in ref:
            torch.testing.assert_close(fused[name], ref[name], rtol=1e-4, atol=1e-5 * float(ref[name].abs().max()))
        return
    assert abs(loss_fused - loss_peft) < 1e-2 * abs(loss_peft)  # bf16 matmuls summed in another order
    for name in ref:
        cos = torch.nn.functional.cosine_similarity(fused[name].flatten(), ref[name].flatten(), dim=0)
        assert cos > 0.99, (name, float(cos))


@pytest.mark.parametrize("kw, unfused", [({"dropout": 0.1}, 14), ({"target_modules": ["q_proj", "v_proj"]}, 10)])
def test_decoder_layers_stay_eager_where_a_4bit_layer_runs_bitsandbytes_own_forward(kw, unfused):
    """LoRA dropout (peft's layers keep those), or projections without LoRA: 4-bit layers off the fused node, a
    path compiled layers were never checked with on a GPU: every layer stays eager, with one line saying why."""
    model = lora_model(base=quantize(make_model(VOCAB)), name="qlora", **kw)
    lines: list[str] = []
    tc = TrainConfig(compile="on", packing="off", fused_lora="on", fused_norm_mlp="off", tiled_mlp="off")
    try:
        took = select.enable(model, tc, "cpu", lines.append)
        assert took.compiled_layers == 0 and not compiled.enabled(model)
        assert compiled.unfused_4bit(model) == unfused and took.fused_lora_layers == 14 - unfused
    finally:
        select.disable(model)
    assert f"fast path off: train.compile=on: layers left eager: {unfused} 4-bit layers run bitsandbytes' own " \
           "forward (no LoRA on them, or LoRA the fused node does not take), which compiled layers were not " \
           "checked with (LoRA on every linear layer with method.dropout=0 takes the node)" in lines


def test_decoder_layers_over_a_4bit_base_compile_with_no_fallback_line(_fresh_dynamo, monkeypatch):
    """train.compile=on over 4-bit layers: every decoder layer compiled, the fused node inside, and no "fast path
    off" line for compile (the layers were left eager with one before the node traced)."""
    monkeypatch.setattr(compiled, "BACKEND", "aot_eager")
    model = lora_model(base=quantize(make_model(VOCAB)), name="qlora")
    lines: list[str] = []
    tc = TrainConfig(compile="on", packing="off", fused_lora="on", fused_norm_mlp="off", tiled_mlp="off")
    try:
        took = select.enable(model, tc, "cpu", lines.append)
        assert took.compiled_layers == 2 and compiled.enabled(model) and took.fused_lora_layers == 14
    finally:
        select.disable(model)
    assert not [line for line in lines if "train.compile" in line], lines
