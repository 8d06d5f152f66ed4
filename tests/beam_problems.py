"""Small seeded beam-search problems and plain-NumPy helpers shared by the beam-search tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from aqlm import _C


@dataclass
class BeamProblem:
    """One layer to encode: weight [out, in], xtx [in, in], codebooks [M, K, og, ig], scales [out/og]."""

    weight: np.ndarray
    xtx: np.ndarray
    codebooks: np.ndarray
    scales: np.ndarray
    codes: np.ndarray  # starting codes, unpacked int64 [out/og, in/ig, M]

    @property
    def nbits(self) -> int:
        return int(self.codebooks.shape[1]).bit_length() - 1


def correlated_xtx(in_features: int, tokens: int, rng: np.random.Generator) -> np.ndarray:
    """X^T X / tokens for correlated activations X = Z A (A = I + dense mixing, a few loud features)."""
    mixing = np.eye(in_features) + rng.standard_normal((in_features, in_features)) / np.sqrt(in_features)
    activations = rng.standard_normal((tokens, in_features)) @ mixing
    activations[:, : max(1, in_features // 16)] *= 4.0
    xtx = activations.T @ activations / tokens
    return ((xtx + xtx.T) / 2).astype(np.float32)


def make_problem(
    out_features: int,
    in_features: int,
    out_group_size: int,
    in_group_size: int,
    num_codebooks: int,
    nbits: int,
    seed: int,
) -> BeamProblem:
    """Random weight and codebooks of matching scale, correlated xtx, random scales and start codes."""
    rng = np.random.default_rng(seed)
    K = 2**nbits
    weight = rng.standard_normal((out_features, in_features)).astype(np.float32)
    codebooks = rng.standard_normal((num_codebooks, K, out_group_size, in_group_size)) / np.sqrt(num_codebooks)
    scales = rng.uniform(0.5, 1.5, out_features // out_group_size)
    codes = rng.integers(0, K, (out_features // out_group_size, in_features // in_group_size, num_codebooks))
    return BeamProblem(
        weight=weight,
        xtx=correlated_xtx(in_features, 4 * in_features, rng),
        codebooks=codebooks.astype(np.float32),
        scales=scales.astype(np.float32),
        codes=codes,
    )


def pack(codes: np.ndarray, nbits: int) -> np.ndarray:
    """Codes in [0, 2**nbits) in the two's-complement storage form of the format (int8 or int16)."""
    K = 2**nbits
    stored = np.where(codes >= K // 2, codes - K, codes)
    return np.ascontiguousarray(stored.astype(np.int8 if nbits <= 8 else np.int16))


def unpack(stored: np.ndarray, nbits: int) -> np.ndarray:
    """Stored codes read back as int64 values in [0, 2**nbits)."""
    return stored.astype(np.int64) % (2**nbits)


def dequantize(codes: np.ndarray, codebooks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """W[o*og + r, j*ig + i] = scales[o] * sum_m codebooks[m, codes[o, j, m], r, i], in float64."""
    num_out_groups, num_in_groups, M = codes.shape
    _, _, og, ig = codebooks.shape
    blocks = sum(codebooks.astype(np.float64)[m][codes[:, :, m]] for m in range(M))  # [OG, G, og, ig]
    blocks = blocks * scales.astype(np.float64)[:, None, None, None]
    return blocks.transpose(0, 2, 1, 3).reshape(num_out_groups * og, num_in_groups * ig)


def residual_terms(problem: BeamProblem, codes: np.ndarray, identity: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(gradient (W - What) H, per-output-group losses) in float64; ``identity`` uses H = I."""
    residual = problem.weight.astype(np.float64) - dequantize(codes, problem.codebooks, problem.scales)
    gradient = residual if identity else residual @ problem.xtx.astype(np.float64)
    og = problem.codebooks.shape[2]
    losses = (residual * gradient).sum(axis=1).reshape(-1, og).sum(axis=1)
    return gradient, losses


@dataclass
class BeamRun:
    """What one C beam-search call returned (codes unpacked)."""

    codes: np.ndarray
    gradient: np.ndarray
    losses: np.ndarray


def run_beam_search(
    problem: BeamProblem, codes: Optional[np.ndarray] = None, *, identity: bool = False, **options
) -> BeamRun:
    """One C pass from ``codes`` (default: the problem's start codes); ``identity`` passes xtx=None;
    ``options`` go to _C.beam_search."""
    codes = problem.codes if codes is None else codes
    gradient, losses = residual_terms(problem, codes, identity)
    stored = pack(codes, problem.nbits)
    gradient32 = np.ascontiguousarray(gradient, dtype=np.float32)
    xtx = None if identity else problem.xtx
    _C.beam_search(xtx, problem.codebooks, problem.scales, stored, gradient32, losses, **options)
    return BeamRun(unpack(stored, problem.nbits), gradient32, losses)
