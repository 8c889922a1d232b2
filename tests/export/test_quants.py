"""slimtune's numpy Q4_K / Q6_K against llama.cpp's block layout, read back by `gguf.quants.dequantize`."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants
from gguf.quants import Q4_K

from slimtune.export.quants import _pack_scales_k4, quantize_q4_k, quantize_q6_k

QUANTIZERS = {T.Q4_K: quantize_q4_k, T.Q6_K: quantize_q6_k}
BLOCK_BYTES = {T.Q4_K: 144, T.Q6_K: 210}  # ggml-common.h: block_q4_K, block_q6_K
# Relative RMS error on Gaussian weights. Measured: Q4_K 0.072, Q6_K 0.0178 (gguf's own Q4_0 0.086,
# Q5_0 0.043 on the same data): 4-bit codes with a per-32 scale and min, 6-bit codes per 16. The bounds
# leave ~10% margin; a scale or nibble in the wrong place gives errors of order 1.
BOUND = {T.Q4_K: 0.08, T.Q6_K: 0.02}


def rel_rmse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(((x - y) ** 2).mean() / (x ** 2).mean()))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=["q4_k", "q6_k"])
@pytest.mark.parametrize("shape", [(7, 256), (3, 1536), (1, 2, 512)])
def test_dequantized_by_gguf_within_bound(qtype, shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32) * 0.05
    packed = QUANTIZERS[qtype](x)
    assert packed.dtype == np.uint8 and packed.shape == (*shape[:-1], shape[-1] // 256 * BLOCK_BYTES[qtype])
    y = quants.dequantize(packed, qtype)
    assert y.shape == x.shape
    assert rel_rmse(x, y) <= BOUND[qtype]


def test_better_than_the_legacy_types_of_the_same_width():
    x = np.random.default_rng(2).standard_normal((16, 1024)).astype(np.float32)
    q4_0 = rel_rmse(x, quants.dequantize(quants.quantize(x, T.Q4_0), T.Q4_0))
    q5_0 = rel_rmse(x, quants.dequantize(quants.quantize(x, T.Q5_0), T.Q5_0))
    assert rel_rmse(x, quants.dequantize(quantize_q4_k(x), T.Q4_K)) < 0.9 * q4_0  # the fitted min pays off
    assert rel_rmse(x, quants.dequantize(quantize_q6_k(x), T.Q6_K)) < 0.5 * q5_0


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K], ids=["q4_k", "q6_k"])
@pytest.mark.parametrize("pos", [0, 15, 16, 31, 32, 63, 64, 100, 127, 128, 160, 191, 192, 255])
def test_each_position_lands_where_the_reader_looks(qtype, pos):
    """One large value in a block of small ones comes back at its own index: the nibble and 2-bit
    planes and the sub-block scales are laid out as llama.cpp reads them."""
    x = np.full((1, 256), 0.01, dtype=np.float32)
    x[0, ::7] = -0.01
    x[0, pos] = 1.0
    y = quants.dequantize(QUANTIZERS[qtype](x), qtype)
    assert int(np.abs(y).argmax()) == pos
    assert abs(float(y[0, pos]) - 1.0) < 0.02
    assert np.abs(np.delete(y - x, pos)).max() < 0.02


def test_q4_k_scale_bytes_unpack_with_ggufs_get_scale_min():
    rng = np.random.default_rng(3)
    sc, mn = rng.integers(0, 64, (50, 8)), rng.integers(0, 64, (50, 8))
    got_sc, got_mn = Q4_K.get_scale_min(_pack_scales_k4(sc, mn))
    assert np.array_equal(got_sc, sc) and np.array_equal(got_mn, mn)


def test_header_fields_and_flat_blocks():
    """Q4_K starts with f16 d and dmin, Q6_K ends with f16 d; a zero block comes back exactly, a constant
    one within the f16 rounding of d times the 6-bit scale."""
    x = np.zeros((2, 256), dtype=np.float32)
    x[1] = 0.5
    q4, q6 = quantize_q4_k(x), quantize_q6_k(x)
    assert q4[0].view(np.float16)[:2].tolist() == [0.0, 0.0] and not q4[0].any()
    assert q6[0, -2:].view(np.float16)[0] == 0.0
    assert np.array_equal(quants.dequantize(q4, T.Q4_K)[0], x[0])
    assert np.allclose(quants.dequantize(q4, T.Q4_K), x, atol=1e-3)
    assert np.allclose(quants.dequantize(q6, T.Q6_K), x, atol=1e-3)
    # all positive: the min is pinned to 0 (dmin 0) and 15 * d * scale reaches 0.5
    d, dmin = q4[1].view(np.float16)[:2].astype(np.float32)
    assert dmin == 0.0 and d > 0
