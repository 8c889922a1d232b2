"""The in-place scale searches against the plain expressions they replaced: the same Q4_0 / Q5_0 bytes, block
for block, whatever the chunking, and the same Q4_K (scale, min) fits bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

from slimtune.export import quants
from slimtune.export.quants import (LEGACY, TARGETS, _codes, _f16, _fit_scale_min, _nearest, _werr, block_weights,
                                    quantize_legacy, rowdot)


def reference_fit(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """fit_symmetric_weighted in plain expressions: a new array for each candidate's codes and products."""
    peak = np.take_along_axis(x, np.abs(x).argmax(axis=1)[:, None], axis=1)
    zero = np.abs(peak) < 1e-30
    peak = np.where(zero, 1.0, peak)
    d0 = np.where(zero, 0.0, peak / -nmax)
    abs_d = _f16(d0).astype(np.float32)
    abs_q = np.clip(np.trunc(x / np.where(zero, 1.0, d0) + nmax + 0.5) - nmax, -nmax, nmax - 1)
    wx = w * x
    sumx2 = rowdot(wx, x)
    best, best_t = np.full_like(sumx2, np.inf), np.zeros_like(sumx2)
    for target in TARGETS[nmax]:
        q = np.clip(np.rint(x * (target / peak)), -nmax, nmax - 1)
        sumlx, suml2 = rowdot(wx, q), rowdot(w * q, q)
        d = _f16(sumlx / np.where(suml2 > 0, suml2, 1.0)).astype(np.float32)
        err = d * d * suml2 - 2 * d * sumlx + sumx2
        better = err < best
        best, best_t = np.where(better, err, best), np.where(better, target, best_t)
    q = np.clip(np.rint(x * (best_t / peak)), -nmax, nmax - 1)
    suml2 = rowdot(w * q, q)
    d = _f16(rowdot(wx, q) / np.where(suml2 > 0, suml2, 1.0)).astype(np.float32)
    refit = _codes(x, d, nmax)
    q = np.where((_werr(x, w, d, refit) < _werr(x, w, d, q))[:, None], refit, q)
    keep = (_werr(x, w, abs_d, abs_q) <= _werr(x, w, d, q)) | zero[:, 0]
    return np.where(keep[:, None], abs_d, d), np.where(keep[:, None], abs_q, q)


def weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian rows of mixed magnitude, with an all-zero block, a constant block and a lone spike."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 10.0 ** rng.integers(-4, 2, (rows, 1))).astype(np.float32)
    x[0, :32], x[1, 32:64], x[2, 5] = 0.0, 0.25, 40.0
    return x


@pytest.mark.parametrize("kind", ["q4_0", "q5_0"])
@pytest.mark.parametrize("with_imatrix", [False, True], ids=["plain", "imatrix"])
def test_same_blocks_as_the_plain_search(kind, with_imatrix, monkeypatch):
    x = weights(24, 192, seed=3 + with_imatrix)
    imatrix = np.random.default_rng(5).random(192).astype(np.float32) if with_imatrix else None
    nmax, pack, _ = LEGACY[kind]
    want = pack(*reference_fit(x.reshape(-1, 32), block_weights(x, imatrix).reshape(-1, 32), nmax)).reshape(24, -1)
    for chunk in (1 << 16, 192 * 5, 1):  # one step, steps of 5 rows (the last one short), one row at a time
        monkeypatch.setattr(quants, "CHUNK", chunk)
        got = quantize_legacy(x, kind, imatrix)
        assert got.dtype == np.uint8 and got.tobytes() == want.tobytes(), chunk


def reference_scale_min(x: np.ndarray, w: np.ndarray, nmax: int, nstep: int, rmin: float,
                        rdelta: float) -> tuple[np.ndarray, np.ndarray]:
    """_fit_scale_min as first written (llama.cpp's make_qkx2_quants on every row at once)."""
    lo, hi = np.minimum(x.min(axis=1), 0.0), x.max(axis=1)
    span = hi - lo
    flat = span <= 0
    span = np.where(flat, 1.0, span)
    sum_w, sum_x = w.sum(axis=1), (w * x).sum(axis=1)
    best_scale, best_min = span / nmax, lo.copy()
    q = np.clip(_nearest((x - lo[:, None]) * (nmax / span)[:, None]), 0, nmax)
    best_err = (w * (best_scale[:, None] * q + lo[:, None] - x) ** 2).sum(axis=1)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / span
        q = np.clip(_nearest(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        sum_l, sum_l2, sum_xl = (w * q).sum(axis=1), (w * q * q).sum(axis=1), (w * q * x).sum(axis=1)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        det = np.where(ok, det, 1.0)
        scale = (sum_w * sum_xl - sum_x * sum_l) / det
        mn = (sum_l2 * sum_x - sum_l * sum_xl) / det
        pos = mn > 0
        scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), scale)
        mn = np.where(pos, 0.0, mn)
        err = (w * (scale[:, None] * q + mn[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best_err)
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_min = np.where(better, mn, best_min)
    return np.where(flat, 0.0, best_scale), 0.0 - best_min


@pytest.mark.parametrize("search", [(20, -1.0, 0.1), (36, -0.9, 0.05)], ids=["plain", "imatrix"])
def test_q4_k_fit_same_as_the_plain_search(search):
    x = weights(16, 256, seed=7)
    x[3, :32] = np.abs(x[3, :32])  # an all-positive sub-block: its min is pinned to 0
    sub = x.reshape(-1, 32)
    w = np.random.default_rng(8).random(sub.shape).astype(np.float32) + np.abs(sub)
    got, want = _fit_scale_min(sub, w, 15, *search), reference_scale_min(sub, w, 15, *search)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
