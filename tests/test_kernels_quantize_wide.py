"""`topk_scores` and `gradient_update` on the shapes the beam search runs most: codebooks of a
multiple of 32 codewords (k = 1) and in_group_size 8, where the AVX-512 versions take their own
path. Every level must give the scalar reference's bits, including ties and the block seams."""
from __future__ import annotations

import numpy as np
import pytest

from aqlm import _C
from simd_levels import simd_params

CODEBOOK_SIZES = (32, 64, 256, 1056, 4096)


@pytest.mark.parametrize("simd", simd_params())
@pytest.mark.parametrize("K", CODEBOOK_SIZES)
def test_top1_matches_scalar(simd: str, K: int) -> None:
    rng = np.random.default_rng(K)
    for D in (1, 2, 7, 8, 9, 16, 33):
        for n in (1, 3, 4, 5, 9):
            q = rng.standard_normal((n, D)).astype(np.float32)
            ct = rng.standard_normal((D, K)).astype(np.float32)
            bias = (ct.astype(np.float64) ** 2).sum(axis=0).astype(np.float32)
            values, indices = _C.topk_scores(q, ct, bias, 1, simd=simd)
            scalar_values, scalar_indices = _C.topk_scores(q, ct, bias, 1, simd="scalar")
            np.testing.assert_array_equal(indices, scalar_indices, err_msg=f"D={D} K={K} n={n}")
            np.testing.assert_array_equal(values, scalar_values, err_msg=f"D={D} K={K} n={n}")


@pytest.mark.parametrize("simd", simd_params())
@pytest.mark.parametrize("K", CODEBOOK_SIZES)
def test_top1_ties_go_to_the_smaller_index(simd: str, K: int) -> None:
    """Codewords repeat three distinct ones, so the minimum is tied across lanes, vectors and blocks."""
    rng = np.random.default_rng(K + 1)
    D = 8
    base = rng.standard_normal((D, 3)).astype(np.float32)
    ct = np.ascontiguousarray(base[:, np.arange(K) % 3])
    bias = np.ascontiguousarray((base.astype(np.float64) ** 2).sum(axis=0).astype(np.float32)[np.arange(K) % 3])
    q = rng.standard_normal((6, D)).astype(np.float32)
    values, indices = _C.topk_scores(q, ct, bias, 1, simd=simd)
    scalar_values, scalar_indices = _C.topk_scores(q, ct, bias, 1, simd="scalar")
    np.testing.assert_array_equal(indices, scalar_indices)
    np.testing.assert_array_equal(values, scalar_values)
    assert np.all(indices < 3)


# From 8192 codewords the AVX-512 top-1 keeps only per-lane minima and rescans the winning chunk.
LARGE_CODEBOOK_SIZES = (8192, 8224, 16384 + 96)


@pytest.mark.parametrize("simd", simd_params())
@pytest.mark.parametrize("K", LARGE_CODEBOOK_SIZES)
def test_top1_large_codebooks_match_scalar(simd: str, K: int) -> None:
    """The chunked top-1 path: random scores, repeated codewords (ties in every chunk, lane and
    block), a minimum planted in the last codeword and NaN or +inf scores, all as the reference."""
    rng = np.random.default_rng(K + 3)
    for D in (1, 8, 9, 33):
        for n in (1, 4, 5, 9):
            q = rng.standard_normal((n, D)).astype(np.float32)
            ct = rng.standard_normal((D, K)).astype(np.float32)
            bias = (ct.astype(np.float64) ** 2).sum(axis=0).astype(np.float32)
            cases = [(ct, bias)]
            period = 7
            cases.append((np.ascontiguousarray(ct[:, np.arange(K) % period]), np.ascontiguousarray(bias[np.arange(K) % period])))
            planted = bias.copy()
            planted[-1] = -1e30
            planted[: K // 2 : 5] = np.nan
            cases.append((ct, planted))
            blocked = bias.copy()
            blocked[K // 3 :] = np.inf
            cases.append((ct, blocked))
            for cti, biasi in cases:
                values, indices = _C.topk_scores(q, cti, biasi, 1, simd=simd)
                scalar_values, scalar_indices = _C.topk_scores(q, cti, biasi, 1, simd="scalar")
                np.testing.assert_array_equal(indices, scalar_indices, err_msg=f"D={D} K={K} n={n}")
                np.testing.assert_array_equal(values, scalar_values, err_msg=f"D={D} K={K} n={n}")


@pytest.mark.parametrize("simd", simd_params())
def test_top1_with_infinite_scores_keeps_no_index(simd: str) -> None:
    """Scores of +inf never beat the start value: index -1, as the reference."""
    K, D = 64, 8
    q = np.ones((5, D), dtype=np.float32)
    ct = np.zeros((D, K), dtype=np.float32)
    bias = np.full(K, np.inf, dtype=np.float32)
    bias[40] = 1.0
    values, indices = _C.topk_scores(q, ct, bias, 1, simd=simd)
    np.testing.assert_array_equal(indices, 40)
    bias[40] = np.inf
    values, indices = _C.topk_scores(q, ct, bias, 1, simd=simd)
    np.testing.assert_array_equal(indices, -1)
    assert np.all(np.isinf(values))


@pytest.mark.parametrize("simd", simd_params())
def test_gradient_update_ig8_matches_scalar(simd: str) -> None:
    rng = np.random.default_rng(2)
    for n in (1, 2, 3, 4, 6, 7, 64):
        for width in (1, 15, 16, 17, 40, 576, 4099):
            delta = rng.standard_normal((n, 8)).astype(np.float32)
            h = rng.standard_normal((8, width)).astype(np.float32)
            g0 = rng.standard_normal((n, width)).astype(np.float32)
            g, g_scalar = g0.copy(), g0.copy()
            _C.gradient_update(delta, h, g, simd=simd)
            _C.gradient_update(delta, h, g_scalar, simd="scalar")
            np.testing.assert_array_equal(g, g_scalar, err_msg=f"n={n} width={width}")


def codeword_norms_numpy(ct: np.ndarray, ig: int, h) -> np.ndarray:
    """The norms as the kernels promise them: float64, products rounded before each sum, order r, i, t."""
    D, K = ct.shape
    w = ct.astype(np.float64)
    norm = np.zeros(K)
    for r in range(D // ig):
        for i in range(ig):
            wi = w[r * ig + i]
            if h is None:
                norm = norm + wi * wi
                continue
            hw = np.zeros(K)
            for t in range(ig):
                hw = hw + np.float64(h[i, t]) * w[r * ig + t]
            norm = norm + wi * hw
    return norm.astype(np.float32)


@pytest.mark.parametrize("simd", simd_params())
@pytest.mark.parametrize("K", (1, 31, 32, 33, 256, 1056))
def test_codeword_norms_match_scalar(simd: str, K: int) -> None:
    """Every level against the scalar kernel and the float64 sum it defines, bit for bit, with and
    without xtx, including the tail of codewords past the last multiple of 32."""
    rng = np.random.default_rng(K + 5)
    for og, ig in ((1, 8), (2, 8), (1, 16), (3, 5)):
        ct = rng.standard_normal((og * ig, K)).astype(np.float32)
        x = rng.standard_normal((3 * ig, ig)).astype(np.float32)
        h = (x.T @ x / (3 * ig)).astype(np.float32)
        for hh in (h, None):
            norms = _C.codeword_norms(ct, ig, hh, simd=simd)
            scalar = _C.codeword_norms(ct, ig, hh, simd="scalar")
            assert norms.shape == (K,) and norms.dtype == np.float32
            np.testing.assert_array_equal(norms, scalar, err_msg=f"og={og} ig={ig} K={K} h={hh is not None}")
            np.testing.assert_array_equal(scalar, codeword_norms_numpy(ct, ig, hh))
