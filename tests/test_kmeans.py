"""`aqlm._C.kmeans` against a plain-NumPy Lloyd reference with the same interface and stopping
rule, plus properties (monotone objective, nearest-centroid assignment, results independent of the
SIMD level and the thread count) and degenerate inputs kept as regression tests."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from aqlm import _C
from parallel import always_parallel  # noqa: F401 (fixture)
from simd_levels import simd_params, supported_levels

SPLIT_EPS = np.float32(1.0 / 1024.0)


@dataclass
class KmeansReference:
    """What the reference returns: the C outputs plus how many clusters it refilled by splitting."""

    centroids: np.ndarray
    assignment: np.ndarray
    objective: float
    splits: int


def nearest(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest centroid of every point (first on ties) and the squared distance, float64."""
    distances = ((x.astype(np.float64)[:, None, :] - centroids.astype(np.float64)[None, :, :]) ** 2).sum(axis=2)
    assignment = distances.argmin(axis=1)
    return assignment, distances[np.arange(len(x)), assignment]


def split_empty_clusters(centroids: np.ndarray, counts: np.ndarray) -> int:
    """Refill empty clusters by splitting the largest one into two copies moved by +-1/1024 (alternating
    sign per coordinate), halving its count, as the C core does. Returns the number refilled."""
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, np.float32(1), np.float32(-1))
    splits = 0
    for c in np.flatnonzero(counts == 0):
        donor = int(counts.argmax())
        if counts[donor] < 2:
            break
        value = centroids[donor].copy()
        centroids[c] = value * (np.float32(1) + sign * SPLIT_EPS)
        centroids[donor] = value * (np.float32(1) - sign * SPLIT_EPS)
        counts[c] = counts[donor] // 2
        counts[donor] -= counts[c]
        splits += 1
    return splits


def kmeans_reference(x: np.ndarray, init: np.ndarray, max_iter: int, tolerance: float) -> KmeansReference:
    """Lloyd iterations from the given initial centroids, with the C core's stopping rule: stop after
    an iteration whose assignment objective improved by no more than ``tolerance`` of the previous."""
    centroids = init.astype(np.float32).copy()
    previous, splits = np.inf, 0
    for iteration in range(max_iter):
        assignment, distances = nearest(x, centroids)
        current = distances.sum()
        counts = np.bincount(assignment, minlength=len(centroids)).astype(np.int64)
        sums = np.zeros(centroids.shape, dtype=np.float64)
        np.add.at(sums, assignment, x.astype(np.float64))
        filled = counts > 0
        centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        if not filled.all():
            splits += split_empty_clusters(centroids, counts)
        if iteration > 0 and previous - current <= tolerance * previous:
            break
        previous = current
    assignment, distances = nearest(x, centroids)
    return KmeansReference(centroids, assignment, float(distances.sum()), splits)


def blobs(n: int, d: int, clusters: int, seed: int, spread: float = 0.3) -> np.ndarray:
    """n float32 points around `clusters` random centres."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)) * 3
    return (centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, d))).astype(np.float32)


def objective_tolerance(x: np.ndarray) -> float:
    """Absolute error bound of the C objective: each distance is |x|^2 + (|c|^2 - 2 x.c) with the
    bracket in float32, so it carries a few float32 ulps of |x|^2 however small the distance."""
    return 1e-6 * float((x.astype(np.float64) ** 2).sum())


def initial_centroids(x: np.ndarray, k: int, init: str, seed: int) -> np.ndarray:
    """The C core's initial centroids (max_iter=0 returns them unchanged)."""
    centroids, _, _ = _C.kmeans(x, k, max_iter=0, max_points_per_centroid=0, init=init, seed=seed)
    return centroids


@pytest.mark.parametrize("init", ["random", "kmeans++"])
def test_init_is_k_distinct_points(init: str) -> None:
    x = blobs(300, 5, 6, seed=1)
    for seed in range(5):
        centroids = initial_centroids(x, 12, init, seed)
        matches = (centroids[:, None, :] == x[None, :, :]).all(axis=2)
        assert matches.any(axis=1).all(), "every initial centroid is one of the points"
        assert len({tuple(row) for row in centroids.tolist()}) == 12, "and no point is taken twice"


@pytest.mark.parametrize(
    "n, d, k, init, seed",
    [(500, 2, 5, "random", 0), (700, 8, 16, "kmeans++", 1), (1200, 3, 7, "random", 2), (400, 17, 4, "kmeans++", 3)],
)
@pytest.mark.parametrize("max_iter, tolerance", [(1, 0.0), (4, 0.0), (30, 0.0), (30, 1e-3)])
def test_matches_numpy_reference(n: int, d: int, k: int, init: str, seed: int, max_iter: int, tolerance: float) -> None:
    x = blobs(n, d, k + 2, seed, spread=1.0)
    init_centroids = initial_centroids(x, k, init, seed)
    centroids, assignment, objective = _C.kmeans(
        x, k, max_iter=max_iter, tolerance=tolerance, max_points_per_centroid=0, init=init, seed=seed
    )
    reference = kmeans_reference(x, init_centroids, max_iter, tolerance)
    np.testing.assert_array_equal(assignment, reference.assignment)
    np.testing.assert_allclose(centroids, reference.centroids, rtol=1e-5, atol=1e-6)
    assert objective == pytest.approx(reference.objective, rel=1e-6, abs=objective_tolerance(x))


def test_objective_never_increases() -> None:
    x = blobs(1000, 6, 40, seed=4, spread=1.5)
    objectives = [
        _C.kmeans(x, 32, max_iter=iterations, tolerance=0.0, max_points_per_centroid=0, seed=5, num_threads=1)[2]
        for iterations in range(0, 12)
    ]
    for earlier, later in zip(objectives, objectives[1:]):
        assert later <= earlier * (1 + 1e-7)
    assert objectives[-1] < 0.8 * objectives[0]


def test_assignment_is_nearest_centroid() -> None:
    x = blobs(3000, 8, 20, seed=6, spread=2.0)
    centroids, assignment, objective = _C.kmeans(x, 16, max_iter=10, seed=7)
    best, best_distance = nearest(x, centroids)
    distance = ((x.astype(np.float64) - centroids[assignment].astype(np.float64)) ** 2).sum(axis=1)
    assert np.all(distance <= best_distance + 1e-5 * (1 + best_distance))
    assert (assignment == best).mean() > 0.999
    assert objective == pytest.approx(distance.sum(), rel=1e-6, abs=objective_tolerance(x))


@pytest.mark.parametrize("init", ["random", "kmeans++"])
@pytest.mark.parametrize("max_points_per_centroid", [0, 100])
def test_identical_across_simd_levels_and_threads(init: str, max_points_per_centroid: int, always_parallel: int) -> None:
    """4100 points x 40 centroids x 8 dims: five assignment chunks of 1024 points and 20 centroids
    per thread in the update, on two threads; with 100 points per centroid it also subsamples."""
    x = blobs(4100, 8, 50, seed=8, spread=1.0)
    runs = [
        _C.kmeans(
            x,
            40,
            max_iter=8,
            max_points_per_centroid=max_points_per_centroid,
            init=init,
            seed=9,
            simd=simd,
            num_threads=threads,
        )
        for simd in supported_levels()
        for threads in (1, always_parallel)
    ]
    for centroids, assignment, objective in runs[1:]:
        np.testing.assert_array_equal(centroids, runs[0][0])
        np.testing.assert_array_equal(assignment, runs[0][1])
        assert objective == runs[0][2]


@pytest.mark.parametrize("simd", simd_params())
def test_each_simd_level_matches_scalar_and_the_numpy_reference(simd: str, always_parallel: int) -> None:
    """Every level on two threads: the same bits as the scalar kernels on one thread (the kernels
    promise identical results), and the scalar result itself follows the NumPy Lloyd reference,
    so the comparison is not of the scalar path with itself. 2100 points: three chunks."""
    x = blobs(2100, 5, 10, seed=10, spread=1.0)
    init = initial_centroids(x, 8, "random", 11)
    reference = kmeans_reference(x, init, 5, 1e-4)
    scalar = _C.kmeans(x, 8, max_iter=5, max_points_per_centroid=0, seed=11, simd="scalar", num_threads=1)
    np.testing.assert_array_equal(scalar[1], reference.assignment)
    np.testing.assert_allclose(scalar[0], reference.centroids, rtol=1e-5, atol=1e-6)
    assert scalar[2] == pytest.approx(reference.objective, rel=1e-6, abs=objective_tolerance(x))
    centroids, assignment, objective = _C.kmeans(
        x, 8, max_iter=5, max_points_per_centroid=0, seed=11, simd=simd, num_threads=always_parallel
    )
    np.testing.assert_array_equal(centroids, scalar[0], err_msg=f"simd={simd} vs scalar")
    np.testing.assert_array_equal(assignment, scalar[1], err_msg=f"simd={simd} vs scalar")
    assert objective == scalar[2]


@pytest.mark.parametrize("n, k", [(7, 7), (5, 9), (1, 3)])
def test_every_point_becomes_a_centroid_when_n_is_at_most_k(n: int, k: int) -> None:
    """faiss `test_nasty_clustering` style: n == k and n < k keep every point, cycling through them."""
    x = blobs(n, 4, 3, seed=n)
    centroids, assignment, objective = _C.kmeans(x, k, seed=1)
    np.testing.assert_array_equal(centroids, x[np.arange(k) % n])
    np.testing.assert_array_equal(assignment, np.arange(n))
    assert objective == 0.0


def test_all_points_identical() -> None:
    x = np.full((200, 6), 0.75, dtype=np.float32)
    for init in ("random", "kmeans++"):
        centroids, assignment, objective = _C.kmeans(x, 5, max_iter=10, max_points_per_centroid=0, init=init)
        assert np.isfinite(centroids).all()
        np.testing.assert_allclose(centroids, 0.75, rtol=1e-2)
        assert np.all((assignment >= 0) & (assignment < 5))
        assert 0.0 <= objective < 1e-3


def test_empty_clusters_are_split_like_the_reference() -> None:
    """Every point appears twice, so random init often takes both copies of one point: the later
    centroid wins no point and must be refilled by splitting the largest cluster."""
    base = blobs(60, 3, 4, seed=12)
    x = np.repeat(base, 2, axis=0)
    split_seen = 0
    for seed in range(20):
        init_centroids = initial_centroids(x, 30, "random", seed)
        reference = kmeans_reference(x, init_centroids, 6, 0.0)
        centroids, assignment, objective = _C.kmeans(
            x, 30, max_iter=6, tolerance=0.0, max_points_per_centroid=0, seed=seed
        )
        np.testing.assert_array_equal(assignment, reference.assignment)
        np.testing.assert_allclose(centroids, reference.centroids, rtol=1e-5, atol=1e-6)
        assert objective == pytest.approx(reference.objective, rel=1e-6, abs=objective_tolerance(x))
        split_seen += reference.splits
    assert split_seen > 0, "the data should produce empty clusters"


def test_non_finite_input_names_the_position() -> None:
    x = blobs(50, 4, 3, seed=13)
    for bad in (np.nan, np.inf, -np.inf):
        broken = x.copy()
        broken[17, 2] = bad
        with pytest.raises(ValueError, match="non-finite value at point 17, coordinate 2"):
            _C.kmeans(broken, 4)


def test_bad_arguments_raise_clear_errors() -> None:
    x = blobs(50, 4, 3, seed=14)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        _C.kmeans(x, 0)
    with pytest.raises(ValueError, match="k must be >= 1, got -3"):
        _C.kmeans(x, -3)
    with pytest.raises(ValueError, match="d <= 64, got n=50 d=65"):
        _C.kmeans(np.zeros((50, 65), dtype=np.float32), 4)
    with pytest.raises(ValueError, match="n >= 1"):
        _C.kmeans(np.zeros((0, 4), dtype=np.float32), 4)
    with pytest.raises(TypeError, match="x must have dtype float32, got numpy.float64"):
        _C.kmeans(x.astype(np.float64), 4)
    with pytest.raises(TypeError, match="x must be a numpy.ndarray, got list"):
        _C.kmeans(x.tolist(), 4)
    with pytest.raises(ValueError, match="x must have 2 dimensions, got 1"):
        _C.kmeans(x[:, 0].copy(), 4)
    with pytest.raises(ValueError, match="max_iter must be >= 0, got -1"):
        _C.kmeans(x, 4, max_iter=-1)
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        _C.kmeans(x, 4, tolerance=-0.5)
    with pytest.raises(ValueError, match="max_points_per_centroid must be >= 0"):
        _C.kmeans(x, 4, max_points_per_centroid=-1)
    with pytest.raises(ValueError, match="init must be 'random' or 'kmeans\\+\\+', got 'forgy'"):
        _C.kmeans(x, 4, init="forgy")
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        _C.kmeans(x, 4, num_threads=0)


def test_strided_input_is_accepted() -> None:
    wide = blobs(300, 8, 5, seed=15)
    strided = wide[:, ::2]
    assert not strided.flags.c_contiguous
    result = _C.kmeans(strided, 6, max_iter=5, seed=3)
    expected = _C.kmeans(np.ascontiguousarray(strided), 6, max_iter=5, seed=3)
    for got, want in zip(result[:2], expected[:2]):
        np.testing.assert_array_equal(got, want)


def test_kmeanspp_is_not_worse_than_random_on_clustered_data() -> None:
    """Averaged over seeds, on well-separated clusters: clearly better right after init, and not
    worse after a few Lloyd iterations."""
    x = blobs(1000, 4, 16, seed=16, spread=0.2)
    after_init = {init: [] for init in ("random", "kmeans++")}
    after_lloyd = {init: [] for init in ("random", "kmeans++")}
    for init in after_init:
        for seed in range(8):
            after_init[init].append(_C.kmeans(x, 16, max_iter=0, init=init, seed=seed, num_threads=1)[2])
            after_lloyd[init].append(_C.kmeans(x, 16, max_iter=5, init=init, seed=seed, num_threads=1)[2])
    assert np.mean(after_init["kmeans++"]) < 0.7 * np.mean(after_init["random"])
    assert np.mean(after_lloyd["kmeans++"]) <= np.mean(after_lloyd["random"])


def test_kmeanspp_draws_over_many_chunks_the_same_on_any_thread_count(always_parallel: int) -> None:
    """k-means++ folds distances in chunks of 4096 points, in parallel, and draws by walking the
    chunk sums: on 3 chunks and a tail, the seeding must not depend on the thread count, must take
    distinct points, and must spread over every chunk (clusters laid out chunk by chunk) as well
    as it does on one chunk's worth of the same data."""
    rng = np.random.default_rng(17)
    centres = rng.standard_normal((48, 8)).astype(np.float32) * 10
    labels = np.repeat(np.arange(48), (3 * 4096 + 37) // 48 + 1)[: 3 * 4096 + 37]  # clusters in point order
    x = (centres[labels] + 0.05 * rng.standard_normal((len(labels), 8))).astype(np.float32)
    seeded = [_C.kmeans(x, 48, max_iter=0, max_points_per_centroid=0, init="kmeans++", seed=seed, num_threads=threads)
              for seed in range(4) for threads in (1, always_parallel)]
    for one, many in zip(seeded[::2], seeded[1::2]):
        np.testing.assert_array_equal(one[0], many[0])
        assert one[2] == many[2]
    for centroids, _, _ in seeded[::2]:
        assert len({tuple(row) for row in centroids.tolist()}) == 48
        hit = {int(labels[np.flatnonzero((x == row).all(axis=1))[0]]) for row in centroids}
        assert len(hit) >= 44, f"k-means++ found only {len(hit)} of 48 well-separated clusters"
