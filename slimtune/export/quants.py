"""K-quants in numpy: Q4_K and Q6_K blocks byte for byte as llama.cpp lays them out (ggml-common.h).

The `gguf` package (0.19) writes Q8_0/Q4_0/Q5_0/BF16 but can only read the K-quants, so these two are
ours. The search for each sub-block's scale follows llama.cpp's reference quantizers
(`make_qkx2_quants` for Q4_K: a weighted least-squares fit of scale and min over 21 candidate scales;
`make_qx_quants` for Q6_K: 19 candidate scales, weights x^2), run on every sub-block of the tensor at
once instead of one block at a time. `tests/export/test_quants.py` dequantizes with `gguf.quants` and
checks the layout bit by bit.

Q4_K, 144 bytes per 256 values: f16 d, f16 dmin, 12 bytes of eight 6-bit (scale, min) pairs, 128 bytes
of 4-bit codes (32-byte groups: low nibbles hold sub-block 2j, high nibbles sub-block 2j+1).
value = d * scale_j * q - dmin * min_j.
Q6_K, 210 bytes per 256 values: 128 bytes of low 4 bits, 64 bytes of high 2 bits, 16 int8 scales
(one per 16 values), f16 d. value = d * scale_j * (q - 32).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

QK_K = 256


def _nearest(x: np.ndarray) -> np.ndarray:
    # llama.cpp's nearest_int rounds half away from zero; np.rint would round half to even
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _fit_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, nstep: int = 20, rmin: float = -1.0,
                   rdelta: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """(scale, -min) per row of x (n, 32) minimizing sum w * (scale*q + min - x)^2, q in 0..nmax,
    as llama.cpp's make_qkx2_quants (min is never above 0, so a row of positives still spans 0)."""
    lo = np.minimum(x.min(axis=1), 0.0)
    hi = x.max(axis=1)
    span = hi - lo
    flat = span <= 0
    span = np.where(flat, 1.0, span)
    sum_w, sum_x = w.sum(axis=1), (w * x).sum(axis=1)
    best_scale = span / nmax
    best_min = lo.copy()
    q = np.clip(_nearest((x - lo[:, None]) * (nmax / span)[:, None]), 0, nmax)
    best_err = (w * (best_scale[:, None] * q + lo[:, None] - x) ** 2).sum(axis=1)
    shifted = x - lo[:, None]  # never negative: _nearest's rounding is floor(v + 0.5) here
    q, wq, tmp = np.empty_like(x), np.empty_like(x), np.empty_like(x)  # reused by every step
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / span
        np.multiply(iscale[:, None], shifted, out=q)
        np.add(q, 0.5, out=q)
        np.floor(q, out=q)
        np.minimum(np.maximum(q, 0, out=q), nmax, out=q)
        np.multiply(w, q, out=wq)
        sum_l, sum_l2 = wq.sum(axis=1), np.multiply(wq, q, out=tmp).sum(axis=1)
        sum_xl = np.multiply(wq, x, out=tmp).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, 1.0)
        scale = (sum_w * sum_xl - sum_x * sum_l) / det
        mn = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = mn > 0  # a positive min is not representable: pin it to 0 and refit the scale alone
        scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), scale)
        mn = np.where(pos, 0.0, mn)
        np.multiply(scale[:, None], q, out=tmp)
        np.add(tmp, mn[:, None], out=tmp)
        np.subtract(tmp, x, out=tmp)
        err = np.multiply(w, np.square(tmp, out=tmp), out=tmp).sum(axis=1)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, mn, best_min)
    best_scale = np.where(flat, 0.0, best_scale)
    return best_scale, 0.0 - best_min  # 0.0 - 0.0 is +0.0: an all-positive block stores dmin 0, not -0


def _pack_scales_k4(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block (n, 8) into llama.cpp's 12 bytes (get_scale_min_k4)."""
    sc, mn = sc.astype(np.uint8), mn.astype(np.uint8)
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = mn[:, :4] | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return out


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _column_weights(rows: np.ndarray, columns: np.ndarray | None, size: int) -> np.ndarray:
    """columns (one per column of rows) repeated over the rows and cut into (-1, size) sub-blocks."""
    return np.broadcast_to(np.asarray(columns, dtype=np.float32), rows.shape).reshape(-1, size)


def quantize_q4_k(data: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """float rows (..., k*256) -> uint8 (..., k*144) of Q4_K blocks; columns: importance per column."""
    rows = np.asarray(data, dtype=np.float32)
    shape = rows.shape
    blocks = rows.reshape(-1, QK_K)
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, 32)
    if columns is None:  # llama.cpp weighs each value by the block's rms plus its own size
        av = np.sqrt((blocks * blocks).sum(axis=1) / QK_K)
        w = np.repeat(av, 8)[:, None] + np.abs(sub)
        scale, neg_min = _fit_scale_min(sub, w, 15)
    else:  # quantize_row_q4_K_impl with quant_weights: imatrix * sqrt(sigma2 + x^2), make_qkx3's search
        sigma2 = np.repeat(2 * (blocks * blocks).mean(axis=1), 8)[:, None]
        w = _column_weights(rows, columns, 32) * np.sqrt(sigma2 + sub * sub)
        scale, neg_min = _fit_scale_min(sub, w, 15, nstep=36, rmin=-0.9, rdelta=0.05)
    scale, neg_min = scale.reshape(n, 8), neg_min.reshape(n, 8)
    max_scale, max_min = scale.max(axis=1), neg_min.max(axis=1)
    inv_s = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1), 0.0)
    inv_m = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1), 0.0)
    ls = np.minimum(_nearest(inv_s[:, None] * scale), 63)
    lm = np.minimum(_nearest(inv_m[:, None] * neg_min), 63)
    d, dmin = _f16(max_scale / 63.0), _f16(max_min / 63.0)
    # the codes are refit to the rounded (f16 d, 6-bit scale) that the reader will use
    eff_d = (d.astype(np.float32)[:, None] * ls).reshape(n * 8, 1)
    eff_m = (dmin.astype(np.float32)[:, None] * lm).reshape(n * 8, 1)
    safe = np.where(eff_d == 0, 1.0, eff_d)
    q = np.where(eff_d == 0, 0, np.clip(_nearest((sub + eff_m) / safe), 0, 15)).astype(np.uint8)
    q = q.reshape(n, 4, 2, 32)
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(n, 128)
    out = np.concatenate([d.reshape(n, 1).view(np.uint8), dmin.reshape(n, 1).view(np.uint8),
                          _pack_scales_k4(ls, lm), qs], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 144)


def _fit_symmetric(x: np.ndarray, nmax: int, w: np.ndarray | None = None) -> np.ndarray:
    """Scale per row of x (n, 16) for codes in -nmax..nmax-1, weights w (default x^2), as llama.cpp's
    make_qx_quants (rmse_type 1): the signed largest value maps to -nmax, then 19 nearby scales are tried."""
    idx = np.abs(x).argmax(axis=1)
    peak = x[np.arange(x.shape[0]), idx]
    zero = np.abs(peak) < 1e-30
    peak = np.where(zero, 1.0, peak)
    w = x * x if w is None else w

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q = np.clip(_nearest(iscale[:, None] * x), -nmax, nmax - 1)
        return (w * x * q).sum(axis=1), (w * q * q).sum(axis=1)

    sumlx, suml2 = fit(-nmax / peak)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = fit(-(nmax + 0.1 * step) / peak)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        scale = np.where(better, sumlx / np.where(suml2 > 0, suml2, 1), scale)
        best = np.where(better, scale * sumlx, best)
    return np.where(zero, 0.0, scale)


def quantize_q6_k(data: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """float rows (..., k*256) -> uint8 (..., k*210) of Q6_K blocks; columns: importance per column."""
    rows = np.asarray(data, dtype=np.float32)
    shape = rows.shape
    blocks = rows.reshape(-1, QK_K)
    n = blocks.shape[0]
    sub = blocks.reshape(n * 16, 16)
    w = None
    if columns is not None:  # quantize_row_q6_K_impl: imatrix * sqrt(sigma2 + x^2), sigma2 the row's mean x^2
        flat = rows.reshape(-1, shape[-1])
        sigma2 = np.repeat((flat * flat).mean(axis=1), shape[-1] // 16)[:, None]
        w = _column_weights(rows, columns, 16) * np.sqrt(sigma2 + sub * sub)
    scale = _fit_symmetric(sub, 32, w).reshape(n, 16)
    idx = np.abs(scale).argmax(axis=1)
    max_scale = scale[np.arange(n), idx]
    zero = np.abs(max_scale) < 1e-30
    iscale = np.where(zero, 0.0, -128.0 / np.where(zero, 1.0, max_scale))
    ls = np.minimum(_nearest(iscale[:, None] * scale), 127).astype(np.int8)
    d = _f16(np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, iscale)))
    eff = (d.astype(np.float32)[:, None] * ls).reshape(n * 16, 1)
    safe = np.where(eff == 0, 1.0, eff)
    q = np.where(eff == 0, 32, np.clip(_nearest(sub / safe), -32, 31) + 32).astype(np.uint8)
    q = q.reshape(n, 2, 128)  # two halves of 128 values, each packed alone
    ql = (q[:, :, :64] & 0x0F) | ((q[:, :, 64:] & 0x0F) << 4)
    hi = (q >> 4).reshape(n, 2, 4, 32)
    qh = hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)
    out = np.concatenate([ql.reshape(n, 128), qh.reshape(n, 64), ls.view(np.uint8),
                          d.reshape(n, 1).view(np.uint8)], axis=1)
    return out.reshape(*shape[:-1], shape[-1] // QK_K * 210)


# Q4_0 / Q5_0 (32 values per block, value = d * q, q in -8..7 / -16..15): the layout gguf.quants writes,
# with the scale chosen by a weighted least-squares search instead of d = absmax / -8. llama.cpp does the
# same when given an importance matrix (quantize_row_q4_0_impl: make_qx_quants over 19 scales around
# -nmax / max, weights imatrix * sqrt(sigma2 + x^2); ours in block_weights); here also the scales that
# put the largest value on the positive side (+nmax-1), and the codes are refit to the f16 d the reader
# will use.
QK = 32
CHUNK = 1 << 16  # values per quantize_legacy step: its ~8 float copies stay in the CPU's cache
SCALE_STEPS = np.arange(-9, 10) * 0.1  # llama.cpp's make_qx_quants: nmax + 0.1 * is, is in -9..9
# the largest value of a block mapped near -nmax (llama.cpp's candidates) or near +(nmax - 1)
TARGETS = {n: np.concatenate([-(n + SCALE_STEPS), n - 1 + SCALE_STEPS]).astype(np.float32) for n in (8, 16)}


def block_weights(rows: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    """Weight of each value (rows (n, cols) -> (n, cols)): the column's mean squared input activation, the
    expected share of the squared output error; without an imatrix llama.cpp's sqrt(sigma2 + x^2), sigma2
    the row's mean square. (llama.cpp multiplies the two; on SmolLM2-135M q4_0 the activation alone gave
    +4.7% held-out loss against +6.6% for the product, +12.3% for no imatrix: bench/gguf_export.py.)"""
    if imatrix is not None:
        return np.broadcast_to(np.asarray(imatrix, dtype=np.float32)[None, :], rows.shape)
    return np.sqrt((rows * rows).mean(axis=1, keepdims=True) + rows * rows)


def _codes(x: np.ndarray, d: np.ndarray, nmax: int) -> np.ndarray:
    safe = np.where(d == 0, 1.0, d)
    return np.where(d == 0, 0.0, np.clip(np.rint(x / safe), -nmax, nmax - 1))


def _werr(x: np.ndarray, w: np.ndarray, d: np.ndarray, q: np.ndarray) -> np.ndarray:
    return (w * (d * q - x) ** 2).sum(axis=1)


def rowdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """sum(a * b) along each row, as (n, 1): einsum's fused multiply-add, no (n, 32) product array (about 2x
    numpy's multiply then sum(axis=1) on 32-wide rows)."""
    return np.einsum("ij,ij->i", a, b)[:, None]


def _candidate(x: np.ndarray, w: np.ndarray, wx: np.ndarray, scale: np.ndarray, nmax: int, q: np.ndarray,
               tmp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sum w*x*q, sum w*q*q) per row for the codes q = clip(rint(x * scale)), computed into the buffers q and
    tmp in place (the same float32 operations in the same order as the expressions they replace)."""
    np.multiply(x, scale, out=q)
    np.rint(q, out=q)
    np.clip(q, -nmax, nmax - 1, out=q)
    return rowdot(wx, q), rowdot(np.multiply(w, q, out=tmp), q)


def fit_symmetric_weighted(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """(f16 d as float32 (n, 1), codes (n, 32) in -nmax..nmax-1) per block row of x minimizing
    sum w * (d*q - x)^2 over the candidate scales; never worse than the absmax scale (gguf.quants')."""
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    zero = np.abs(peak) < 1e-30
    peak = np.where(zero, 1.0, peak)
    # the absmax quantizer exactly as gguf.quants / quantize_row_q4_0_ref: codes from the unrounded d
    d0 = np.where(zero, 0.0, peak / -nmax)
    abs_d = _f16(d0).astype(np.float32)
    abs_q = np.clip(np.trunc(x / np.where(zero, 1.0, d0) + nmax + 0.5) - nmax, -nmax, nmax - 1)
    wx = w * x
    sumx2 = rowdot(wx, x)
    # error of scale d with codes q, from two sums: sum w (dq - x)^2 = d^2 sum wq^2 - 2d sum wxq + sum wx^2
    best, best_t = np.full_like(sumx2, np.inf), np.zeros_like(sumx2)
    q, tmp = np.empty_like(x), np.empty_like(x)  # reused by every candidate: no new arrays in the loop
    for target in TARGETS[nmax]:
        sumlx, suml2 = _candidate(x, w, wx, target / peak, nmax, q, tmp)
        d = _f16(sumlx / np.where(suml2 > 0, suml2, 1.0)).astype(np.float32)
        err = d * d * suml2 - 2 * d * sumlx + sumx2
        better = err < best
        best, best_t = np.where(better, err, best), np.where(better, target, best_t)
    q = np.clip(np.rint(x * (best_t / peak)), -nmax, nmax - 1)
    suml2 = rowdot(w * q, q)
    d = _f16(rowdot(wx, q) / np.where(suml2 > 0, suml2, 1.0)).astype(np.float32)
    refit = _codes(x, d, nmax)  # the codes nearest under the f16 d the reader will use
    q = np.where((_werr(x, w, d, refit) < _werr(x, w, d, q))[:, None], refit, q)
    keep = (_werr(x, w, abs_d, abs_q) <= _werr(x, w, d, q)) | zero[:, 0]
    return np.where(keep[:, None], abs_d, d), np.where(keep[:, None], abs_q, q)


def pack_q4_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(n, 1) scales and (n, 32) codes in -8..7 -> (n, 18) bytes of block_q4_0."""
    u = (q + 8).astype(np.uint8)
    return np.concatenate([_f16(d).view(np.uint8), u[:, :16] | (u[:, 16:] << 4)], axis=1)


def pack_q5_0(d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(n, 1) scales and (n, 32) codes in -16..15 -> (n, 22) bytes of block_q5_0 (qh: bit 4 of code j)."""
    u = (q + 16).astype(np.uint8)
    qh = np.packbits((u >> 4).reshape(-1, 32), axis=1, bitorder="little")
    return np.concatenate([_f16(d).view(np.uint8), qh, (u[:, :16] & 0x0F) | ((u[:, 16:] & 0x0F) << 4)], axis=1)


LEGACY = {"q4_0": (8, pack_q4_0, 18), "q5_0": (16, pack_q5_0, 22)}


def quantize_legacy(data: np.ndarray, kind: str, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float rows (..., k*32) -> uint8 (..., k*bytes) of Q4_0 or Q5_0 blocks, scales fit per block to the
    weighted error (imatrix: one weight per column, the mean squared input activation)."""
    nmax, pack, nbytes = LEGACY[kind]
    rows = np.asarray(data, dtype=np.float32)
    shape = rows.shape
    flat = rows.reshape(-1, shape[-1])
    out = np.empty((flat.shape[0], shape[-1] // QK * nbytes), dtype=np.uint8)
    step = max(1, CHUNK // shape[-1])  # rows at a time: the search holds ~8 float copies of its input
    for i in range(0, flat.shape[0], step):
        part = flat[i:i + step]
        d, q = fit_symmetric_weighted(part.reshape(-1, QK), block_weights(part, imatrix).reshape(-1, QK), nmax)
        out[i:i + step] = pack(d, q).reshape(part.shape[0], -1)
    return out.reshape(*shape[:-1], shape[-1] // QK * nbytes)


def encode(data: np.ndarray, qtype: GGMLQuantizationType, columns: np.ndarray | None = None) -> np.ndarray:
    """float32 tensor -> the array the GGUF writer stores for qtype (bytes for block types); columns: the
    weight's importance per column (imatrix.Imatrix), used by the Q4_0/Q5_0/Q4_K/Q6_K searches."""
    from gguf import GGMLQuantizationType as T, quants

    if qtype == T.Q4_K:
        return quantize_q4_k(data, columns)
    if qtype == T.Q6_K:
        return quantize_q6_k(data, columns)
    if qtype in (T.Q4_0, T.Q5_0):
        return quantize_legacy(data, qtype.name.lower(), columns)
    return quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)
