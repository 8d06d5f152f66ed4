"""The two inner loops of k-means and beam search (`topk_scores`, `gradient_update`) at every SIMD
level: bit-identical to the scalar reference and to the fma chain it defines (emulated in NumPy),
close to a float64 NumPy formula, on awkward sizes that hit every SIMD tail and the 512-codeword
block boundary of the AVX2 top-k."""
from __future__ import annotations

import numpy as np
import pytest

from aqlm import _C
from simd_levels import simd_params

CODEBOOK_SIZES = (1, 2, 3, 5, 7, 31, 33, 513)
DIMENSIONS = range(1, 18)


def topk_reference(q: np.ndarray, ct: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """All scores bias[c] + q . ct[:, c] in float64: [n, K]."""
    return bias.astype(np.float64)[None, :] + q.astype(np.float64) @ ct.astype(np.float64)


def score_tolerance(q: np.ndarray, ct: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Per-(row, codeword) bound on float32 accumulation error: a few ulps of the absolute sum."""
    magnitude = np.abs(bias).astype(np.float64)[None, :] + np.abs(q).astype(np.float64) @ np.abs(ct).astype(np.float64)
    return 4 * (q.shape[1] + 1) * np.finfo(np.float32).eps * magnitude + 1e-30


def check_topk_against_float64(
    q: np.ndarray, ct: np.ndarray, bias: np.ndarray, values: np.ndarray, indices: np.ndarray
) -> None:
    """values are the scores of `indices`; no codeword left out scores clearly better; ascending order
    with ties by smaller index."""
    exact = topk_reference(q, ct, bias)
    tolerance = score_tolerance(q, ct, bias)
    rows = np.arange(q.shape[0])[:, None]
    assert np.all((indices >= 0) & (indices < ct.shape[1]))
    assert all(len(set(row)) == len(row) for row in indices.tolist())
    assert np.all(np.abs(values - exact[rows, indices]) <= tolerance[rows, indices])
    left_out = np.ones_like(exact, dtype=bool)
    left_out[rows, indices] = False
    kth = values[:, -1:].astype(np.float64)
    assert not np.any(left_out & (exact < kth - 2 * tolerance))
    later_values, earlier_values = values[:, 1:], values[:, :-1]
    assert np.all(later_values >= earlier_values)
    ties = later_values == earlier_values
    assert np.all(indices[:, 1:][ties] > indices[:, :-1][ties])


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fma(a, b, c), rounded once: a * b of two float32 is exact in x87 extended precision
    (64-bit significand), and so is its sum with c unless their exponents are ~40 apart, when a
    second rounding could only matter at an exact float32 halfway point."""
    wide = np.longdouble
    return (a.astype(wide) * b.astype(wide) + c.astype(wide)).astype(np.float32)


def require_extended_precision() -> None:
    if np.finfo(np.longdouble).nmant < 63:
        pytest.skip("needs numpy.longdouble with a 64-bit significand (x87) to emulate fma")


def fma_chain_scores(q: np.ndarray, ct: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """The scores as the kernels define them, bit for bit: v = bias[c], then v = fma(q[d], ct[d, c], v)
    for d = 0, 1, ... [n, K] float32."""
    values = np.broadcast_to(bias, (q.shape[0], ct.shape[1])).astype(np.float32)
    for d in range(q.shape[1]):
        values = fma32(q[:, d : d + 1], ct[d : d + 1], values)
    return values


def check_topk_is_fma_chain_topk(
    q: np.ndarray, ct: np.ndarray, bias: np.ndarray, values: np.ndarray, indices: np.ndarray
) -> None:
    """indices are the first k of the exact fma-chain scores sorted by (score, index); values their bits."""
    chain = fma_chain_scores(q, ct, bias)
    k = indices.shape[1]
    expected = np.stack([np.lexsort((np.arange(ct.shape[1]), row))[:k] for row in chain])
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(values, np.take_along_axis(chain, expected, axis=1))


def random_topk_problem(rng: np.random.Generator, n: int, D: int, K: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """q [n, D], ct [D, K], bias [K] float32 with the sign and scale spread of the k-means scores."""
    q = rng.standard_normal((n, D)).astype(np.float32)
    ct = rng.standard_normal((D, K)).astype(np.float32)
    bias = (ct.astype(np.float64) ** 2).sum(axis=0).astype(np.float32)
    return q, ct, bias


@pytest.mark.parametrize("simd", simd_params())
@pytest.mark.parametrize("K", CODEBOOK_SIZES)
def test_topk_scores_matches_scalar_and_float64(simd: str, K: int) -> None:
    """Every level, the scalar one included, against the fma chain the kernels promise (computed in
    NumPy) bit for bit; SIMD levels also against the scalar kernel; and all within float32
    accumulation error of the float64 scores."""
    require_extended_precision()
    rng = np.random.default_rng(K)
    for D in DIMENSIONS:
        q, ct, bias = random_topk_problem(rng, 5, D, K)
        for k in sorted({min(k, K) for k in (1, 2, 8, K)}):
            values, indices = _C.topk_scores(q, ct, bias, k, simd=simd)
            scalar_values, scalar_indices = _C.topk_scores(q, ct, bias, k, simd="scalar")
            assert values.shape == indices.shape == (5, k)
            assert values.dtype == np.float32 and indices.dtype == np.int32
            np.testing.assert_array_equal(indices, scalar_indices, err_msg=f"D={D} K={K} k={k}")
            np.testing.assert_array_equal(values, scalar_values, err_msg=f"D={D} K={K} k={k}")
            check_topk_is_fma_chain_topk(q, ct, bias, values, indices)
            check_topk_against_float64(q, ct, bias, values, indices)


@pytest.mark.parametrize("simd", simd_params())
@pytest.mark.parametrize("K", (7, 33, 513, 1100))
def test_topk_scores_breaks_ties_by_smaller_index(simd: str, K: int) -> None:
    """Codewords repeat five distinct ones cyclically, so equal scores are exact ties; they must come
    out ascending by index, also across the 512-codeword blocks."""
    rng = np.random.default_rng(K)
    D = 9
    q, base, base_bias = random_topk_problem(rng, 4, D, 5)
    ct = np.ascontiguousarray(base[:, np.arange(K) % 5])
    bias = np.ascontiguousarray(base_bias[np.arange(K) % 5])
    exact = topk_reference(q, ct, bias)
    for k in sorted({min(k, K) for k in (1, 2, 8, K)}):
        values, indices = _C.topk_scores(q, ct, bias, k, simd=simd)
        for row in range(q.shape[0]):
            expected = np.lexsort((np.arange(K), exact[row]))[:k]
            np.testing.assert_array_equal(indices[row], expected, err_msg=f"K={K} k={k} row={row}")
        check_topk_against_float64(q, ct, bias, values, indices)


@pytest.mark.parametrize("simd", simd_params())
def test_topk_scores_all_equal_codewords_picks_first(simd: str) -> None:
    """Every score equal (here exactly zero): the first k codewords win, in order."""
    K, D = 1030, 8
    q = np.ones((3, D), dtype=np.float32)
    ct = np.zeros((D, K), dtype=np.float32)
    bias = np.zeros(K, dtype=np.float32)
    for k in (1, 2, 8, K):
        values, indices = _C.topk_scores(q, ct, bias, k, simd=simd)
        np.testing.assert_array_equal(indices, np.broadcast_to(np.arange(k, dtype=np.int32), (3, k)))
        np.testing.assert_array_equal(values, 0.0)


def test_topk_scores_rejects_bad_arguments() -> None:
    q = np.zeros((2, 3), dtype=np.float32)
    ct = np.zeros((3, 4), dtype=np.float32)
    bias = np.zeros(4, dtype=np.float32)
    for k in (0, 5):
        with pytest.raises(ValueError, match="1 <= k <= K"):
            _C.topk_scores(q, ct, bias, k)
    with pytest.raises(ValueError, match="1 <= k <= K"):
        _C.topk_scores(q, np.zeros((2, 4), dtype=np.float32), bias, 1)
    with pytest.raises(TypeError, match="q must have dtype float32"):
        _C.topk_scores(q.astype(np.float64), ct, bias, 1)
    with pytest.raises(ValueError, match="unknown SIMD level 'sse9'"):
        _C.topk_scores(q, ct, bias, 1, simd="sse9")


@pytest.mark.parametrize("simd", simd_params())
def test_gradient_update_matches_scalar_and_float64(simd: str) -> None:
    """Every level, the scalar one included, bit for bit against the promised fma chain
    g = fma(-delta[i], h[i], g) for i = 0, 1, ... (computed in NumPy); SIMD levels also against the
    scalar kernel; and all within float32 accumulation error of the float64 formula."""
    require_extended_precision()
    rng = np.random.default_rng(1)
    for n in (1, 2, 3, 4, 5, 7, 9):
        for ig in (1, 3, 8):
            for width in (1, 2, 3, 5, 7, 8, 9, 15, 16, 17, 31, 33, 65):
                delta = rng.standard_normal((n, ig)).astype(np.float32)
                h = rng.standard_normal((ig, width)).astype(np.float32)
                g0 = rng.standard_normal((n, width)).astype(np.float32)
                g, g_scalar = g0.copy(), g0.copy()
                _C.gradient_update(delta, h, g, simd=simd)
                _C.gradient_update(delta, h, g_scalar, simd="scalar")
                np.testing.assert_array_equal(g, g_scalar, err_msg=f"n={n} ig={ig} width={width}")
                chain = g0
                for i in range(ig):
                    chain = fma32(-delta[:, i : i + 1], h[i : i + 1], chain)
                np.testing.assert_array_equal(g, chain, err_msg=f"fma chain: n={n} ig={ig} width={width}")
                exact = g0.astype(np.float64) - delta.astype(np.float64) @ h.astype(np.float64)
                bound = np.abs(g0) + np.abs(delta).astype(np.float64) @ np.abs(h).astype(np.float64)
                assert np.all(np.abs(g - exact) <= 4 * (ig + 1) * np.finfo(np.float32).eps * bound)


def test_gradient_update_rejects_bad_arguments() -> None:
    delta = np.ones((2, 3), dtype=np.float32)
    h = np.ones((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"need delta \[n, ig\]"):
        _C.gradient_update(delta, h, np.zeros((2, 4), dtype=np.float32))
    with pytest.raises(TypeError, match="g must have dtype numpy.float32, got numpy.float64"):
        _C.gradient_update(delta, h, np.zeros((2, 5), dtype=np.float64))
    with pytest.raises(ValueError, match="g must be C-contiguous and writeable"):
        _C.gradient_update(delta, h, np.zeros((5, 2), dtype=np.float32).T)
    frozen = np.zeros((2, 5), dtype=np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="g must be C-contiguous and writeable"):
        _C.gradient_update(delta, h, frozen)
