"""The pure-torch beam search (the benchmark baseline) against the C core on small problems: same
codes for the same visiting order, greedy and beam, plain and shuffled."""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the baseline lives beside its benchmark
from beam_search_torch import beam_search_torch, visiting_order  # noqa: E402
from beam_problems import BeamProblem, make_problem, pack, residual_terms, run_beam_search, unpack

NEAR_TIE = 1e-5


@pytest.fixture(autouse=True)
def one_torch_thread():
    """These problems are tiny: a second intra-op thread only adds synchronisation, which costs
    orders of magnitude more than the work on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_torch(
    problem: BeamProblem, *, identity: bool = False, shuffle: bool = False, seed: int = 0, **options
) -> tuple:
    """One torch pass from the problem's start codes, visiting in the C core's order for (shuffle, seed)."""
    group_order, codebook_order = visiting_order(problem.codes.shape[1], problem.codes.shape[2], shuffle, seed)
    codes, losses = beam_search_torch(
        torch.from_numpy(problem.weight),
        None if identity else torch.from_numpy(problem.xtx),
        torch.from_numpy(problem.codebooks),
        torch.from_numpy(problem.scales),
        torch.from_numpy(pack(problem.codes, problem.nbits)),
        group_order=group_order,
        codebook_order=codebook_order,
        **options,
    )
    return unpack(codes.numpy(), problem.nbits), losses.numpy()


def assert_agrees(problem: BeamProblem, torch_codes: np.ndarray, c_codes: np.ndarray) -> None:
    """Same codes, or (float rounding flipping a near-tie) the same objective within NEAR_TIE."""
    if np.array_equal(torch_codes, c_codes):
        return
    torch_total = residual_terms(problem, torch_codes)[1].sum()
    c_total = residual_terms(problem, c_codes)[1].sum()
    assert torch_total == pytest.approx(c_total, rel=NEAR_TIE)


@pytest.mark.parametrize(
    "out_group_size, in_group_size, num_codebooks, nbits",
    [(1, 4, 1, 2), (2, 8, 3, 4), (1, 16, 2, 5), (1, 8, 3, 7), (2, 16, 2, 8), (1, 8, 1, 12)],
)
@pytest.mark.parametrize("beam_size", [1, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_matches_c_core(
    out_group_size: int, in_group_size: int, num_codebooks: int, nbits: int, beam_size: int, shuffle: bool
) -> None:
    in_features = 16 if nbits > 8 else 32
    problem = make_problem(16, in_features, out_group_size, in_group_size, num_codebooks, nbits, seed=nbits)
    c_result = run_beam_search(problem, beam_size=beam_size, shuffle=shuffle, seed=5, num_threads=1)
    for dtype in (torch.float32, torch.float64):
        codes, losses = run_torch(problem, beam_size=beam_size, shuffle=shuffle, seed=5, compute_dtype=dtype)
        assert_agrees(problem, codes, c_result.codes)
        np.testing.assert_allclose(
            losses, residual_terms(problem, codes)[1], rtol=1e-4 if dtype == torch.float32 else 1e-10
        )


@pytest.mark.parametrize("beam_size", [1, 3])
def test_chunking_output_groups_changes_nothing(beam_size: int) -> None:
    problem = make_problem(24, 32, 1, 8, 2, 6, seed=21)
    whole = run_torch(problem, beam_size=beam_size, compute_dtype=torch.float64)
    chunked = run_torch(problem, beam_size=beam_size, compute_dtype=torch.float64, max_scores=5 * 64)
    np.testing.assert_array_equal(chunked[0], whole[0])
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-12)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_allowed_mask_and_zero_scales_like_c(beam_size: int) -> None:
    problem = make_problem(16, 64, 1, 8, 2, 6, seed=22)
    problem.scales[5] = 0.0
    allowed = np.random.default_rng(1).random((16, 8)) < 0.5
    c_result = run_beam_search(problem, allowed=allowed, beam_size=beam_size, num_threads=1)
    codes, _ = run_torch(problem, allowed=torch.from_numpy(allowed), beam_size=beam_size, compute_dtype=torch.float64)
    kept = ~allowed
    kept[5] = True
    np.testing.assert_array_equal(codes[kept], problem.codes[kept])
    assert_agrees(problem, codes, c_result.codes)


def test_identity_when_xtx_is_none() -> None:
    problem = replace(make_problem(16, 32, 2, 8, 2, 5, seed=23), xtx=np.eye(32, dtype=np.float32))
    with_none = run_torch(problem, identity=True, compute_dtype=torch.float64)
    with_identity = run_torch(problem, compute_dtype=torch.float64)
    c_result = run_beam_search(problem, identity=True, num_threads=1)
    np.testing.assert_array_equal(with_none[0], with_identity[0])
    assert_agrees(problem, with_none[0], c_result.codes)


def test_visiting_order() -> None:
    groups, codebooks = visiting_order(6, 3)
    assert groups == list(range(6))
    assert torch.equal(codebooks, torch.arange(3).expand(6, 3))
    first, first_codebooks = visiting_order(64, 3, shuffle=True, seed=1)
    again, again_codebooks = visiting_order(64, 3, shuffle=True, seed=1)
    other, _ = visiting_order(64, 3, shuffle=True, seed=2)
    assert first == again and torch.equal(first_codebooks, again_codebooks)
    assert sorted(first) == list(range(64)) and first != other
    assert all(sorted(row) == [0, 1, 2] for row in first_codebooks.tolist())


def test_bad_arguments_raise_clear_errors() -> None:
    problem = make_problem(8, 16, 1, 8, 2, 4, seed=24)
    weight, xtx = torch.from_numpy(problem.weight), torch.from_numpy(problem.xtx)
    codebooks, scales = torch.from_numpy(problem.codebooks), torch.from_numpy(problem.scales)
    codes = torch.from_numpy(pack(problem.codes, 4))
    with pytest.raises(ValueError, match=r"xtx must have shape \(16, 16\)"):
        beam_search_torch(weight, xtx[:8, :8], codebooks, scales, codes)
    with pytest.raises(ValueError, match=r"codes must have shape \(8, 2, 2\)"):
        beam_search_torch(weight, xtx, codebooks, scales, codes[:, :1])
    with pytest.raises(ValueError, match="code out of range for 4-bit codebooks"):
        beam_search_torch(weight, xtx, codebooks, scales, codes.to(torch.int64) + 16)
    with pytest.raises(ValueError, match="weight has NaN or Inf"):
        beam_search_torch(weight * torch.nan, xtx, codebooks, scales, codes)
    with pytest.raises(ValueError, match="beam_size must be in"):
        beam_search_torch(weight, xtx, codebooks, scales, codes, beam_size=0)
    with pytest.raises(ValueError, match="group_order must be a permutation"):
        beam_search_torch(weight, xtx, codebooks, scales, codes, group_order=[0, 0])
    with pytest.raises(ValueError, match="do not divide"):
        beam_search_torch(weight[:, :12], xtx[:12, :12], codebooks, scales, codes)
