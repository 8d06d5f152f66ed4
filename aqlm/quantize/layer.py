"""AQLM for one linear layer: minimise ||(W - What) X||^2 = tr((W - What) XTX (W - What)^T).

Initialisation (scales from row norms, codebooks by residual k-means) and the code search (beam
search) run in the C core; codebooks and scales are then updated with codes fixed, by Adam as
upstream does or by an exact least-squares solve (conjugate gradients on the same quadratic).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

from ..format import AqlmScheme, dequantize_reference, pack_codes
from ..ops import (
    CodewordSums, beam_search, codeword_rows, dequantize, kmeans, scale_rows, unscaled_weight, weight_gradients,
)
from .phases import PhaseTimer, maybe_phase

_EPS = 1e-9


@dataclass
class LayerConfig:
    """How to quantize one layer (defaults follow the upstream AQLM implementation).

    Attributes:
        scheme: codebooks, bits and group sizes.
        beam_size: hypotheses kept per output group in the code search (1 = greedy).
        max_epochs: at most this many rounds of (codebook update, code search).
        relative_mse_tolerance: stop when a round improves the error by less than this fraction
            (upstream's recommended value); None runs all max_epochs.
        steps_per_epoch: codebook/scale optimizer steps per round.
        lr: Adam learning rate for codebooks and scales.
        codebook_update: "adam" (upstream: Adam, betas (0, 0.95), amsgrad) or "lstsq" (exact
            minimum over codebooks by conjugate gradients, then closed-form scales).
        lstsq_tolerance: "lstsq" only: end a round's conjugate-gradient solve at the first step
            that lowers the relative error by less than this fraction of it (None: always run
            ``steps_per_epoch`` steps).
        init_max_iter: k-means iterations for the initial codebooks.
        init_max_points_per_centroid: train k-means on a seeded sample of at most this many points
            per centroid, as faiss does (None: all points; upstream trains on all).
        seed: seeds k-means and the order of the code search.
        num_threads: C kernel threads (None: torch.get_num_threads()).
    """

    scheme: AqlmScheme = field(default_factory=lambda: AqlmScheme(1, 16, 8, 1))
    beam_size: int = 1
    max_epochs: int = 1000
    relative_mse_tolerance: Optional[float] = 0.01
    steps_per_epoch: int = 100
    lr: float = 1e-4
    codebook_update: str = "adam"
    lstsq_tolerance: Optional[float] = None
    init_max_iter: int = 100
    init_max_points_per_centroid: Optional[int] = 256
    seed: int = 0
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.init_max_points_per_centroid is not None and self.init_max_points_per_centroid < 1:
            raise ValueError(f"init_max_points_per_centroid must be >= 1 or None, got {self.init_max_points_per_centroid}")
        if self.max_epochs < 0 or self.steps_per_epoch < 0 or self.init_max_iter < 0:
            raise ValueError("max_epochs, steps_per_epoch and init_max_iter must be >= 0")
        if self.relative_mse_tolerance is not None and not 0 <= self.relative_mse_tolerance < 1:
            raise ValueError(f"relative_mse_tolerance must be in [0, 1), got {self.relative_mse_tolerance}")
        if self.codebook_update not in ("adam", "lstsq"):
            raise ValueError(f"codebook_update must be 'adam' or 'lstsq', got {self.codebook_update!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.lstsq_tolerance is not None and not 0 <= self.lstsq_tolerance < 1:
            raise ValueError(f"lstsq_tolerance must be in [0, 1) or None, got {self.lstsq_tolerance}")

    def to_dict(self) -> dict:
        """Plain-JSON form (for progress files and logs)."""
        data = asdict(self)
        data["scheme"] = self.scheme.name
        return data


@dataclass
class LayerResult:
    """Outcome of quantizing one layer; errors are relative: tr(dW H dW^T) / tr(W H W^T)."""

    codes: torch.Tensor
    codebooks: torch.Tensor
    scales: torch.Tensor
    initial_error: float
    final_error: float
    epochs: int
    seconds: float
    threads: int  # of the C kernels (torch's thread count, unless LayerConfig.num_threads says otherwise)


def _threads(config: LayerConfig) -> int:
    return config.num_threads or torch.get_num_threads()


def init_quantized_weight(
    weight: torch.Tensor, config: LayerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales = norms of the output groups; codebooks by residual k-means on the normalised groups.

    Returns (codes packed [OG, G, M], codebooks fp32 [M, K, og, ig], scales fp32 [OG, 1, 1, 1]).
    """
    scheme = config.scheme
    out_features, in_features = weight.shape
    scheme.check_shape(out_features, in_features)
    og, ig = scheme.out_group_size, scheme.in_group_size
    num_out_groups, num_in_groups = out_features // og, in_features // ig
    groups = weight.float().reshape(num_out_groups, og, num_in_groups, ig).swapaxes(1, 2)
    scales = groups.flatten(1).norm(dim=1) + _EPS
    points = (groups / scales.view(-1, 1, 1, 1)).reshape(num_out_groups * num_in_groups, og * ig)
    residual = points.contiguous().clone()
    codebooks, codes = [], []
    for m in range(scheme.num_codebooks):
        centroids, assignment, _ = kmeans(
            residual,
            scheme.codebook_size,
            max_iter=config.init_max_iter,
            max_points_per_centroid=config.init_max_points_per_centroid,
            init="kmeans++" if scheme.codebook_size <= 256 else "random",
            seed=config.seed * 1000003 + m,
            num_threads=_threads(config),
        )
        residual -= centroids[assignment]
        codebooks.append(centroids.view(scheme.codebook_size, og, ig))
        codes.append(assignment)
    codes_tensor = torch.stack(codes, dim=-1).view(num_out_groups, num_in_groups, scheme.num_codebooks)
    return pack_codes(codes_tensor, scheme.nbits_per_codebook), torch.stack(codebooks), scales.view(-1, 1, 1, 1)


class LayerObjective:
    """tr((W - What) H (W - What)^T) for a fixed layer weight W and H = XTX (float32)."""

    def __init__(self, weight: torch.Tensor, xtx: torch.Tensor, out_group_size: int):
        if xtx.shape != (weight.shape[1], weight.shape[1]):
            raise ValueError(f"xtx must have shape {(weight.shape[1],) * 2}, got {tuple(xtx.shape)}")
        if not torch.isfinite(weight).all():
            raise ValueError("the layer weight has NaN or Inf values")
        if not torch.isfinite(xtx).all():
            raise ValueError("XTX has NaN or Inf values (check the calibration activations)")
        self.weight = weight.detach().float().contiguous()
        self.xtx = xtx.detach().float().contiguous()
        self.out_group_size = out_group_size
        self.reference = float((self.weight @ self.xtx * self.weight).sum()) + _EPS

    @torch.no_grad()
    def residual_terms(self, codes, codebooks, scales) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(R = W - What, G = R H, per-output-group losses in float64); never part of an autograd graph."""
        residual = self.weight - dequantize(codes, codebooks, scales.view(-1, 1, 1, 1)).float()
        gradient = residual @ self.xtx
        losses = (residual.double() * gradient.double()).sum(dim=1).view(-1, self.out_group_size).sum(dim=1)
        return residual, gradient, losses

    def relative_error(self, codes, codebooks, scales) -> float:
        """tr(dW H dW^T) / tr(W H W^T)."""
        _, _, losses = self.residual_terms(codes, codebooks, scales)
        return float(losses.sum()) / self.reference


def beam_search_codes(
    objective: LayerObjective,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    beam_size: int,
    seed: int,
    num_threads: int,
    allowed: Optional[torch.Tensor] = None,
) -> float:
    """One beam-search pass in C over ``codes`` (updated in place); returns the relative error."""
    _, gradient, losses = objective.residual_terms(codes, codebooks, scales)
    losses = losses.contiguous()
    beam_search(
        objective.xtx,
        codebooks,
        scales,
        codes,
        gradient.contiguous(),
        losses,
        allowed=allowed,
        beam_size=beam_size,
        shuffle=True,
        seed=seed,
        num_threads=num_threads,
    )
    return float(losses.sum()) / objective.reference


def _adam_update(objective: LayerObjective, codes, codebooks, scales, config: LayerConfig, state: dict) -> None:
    """upstream's codebook/scale step: Adam(lr, betas=(0, 0.95), amsgrad) on the mean output error."""
    optimizer = state.get("adam")
    if optimizer is None:
        optimizer = state["adam"] = torch.optim.Adam([codebooks, scales], lr=config.lr, betas=(0.0, 0.95), amsgrad=True)
    out_features = objective.weight.shape[0]
    for _ in range(config.steps_per_epoch):
        unscaled = unscaled_weight(codes, codebooks)
        residual = scale_rows(unscaled, scales) - objective.weight
        grad_weight = (2.0 / out_features) * (residual @ objective.xtx)
        grad_codebooks, grad_scales = weight_gradients(
            grad_weight, codes, codebooks, scales, True, True, unscaled=unscaled
        )
        codebooks.grad, scales.grad = grad_codebooks, grad_scales
        optimizer.step()


def codeword_preconditioner(
    rows: torch.Tensor, scales: torch.Tensor, xtx: torch.Tensor, codebooks_shape: torch.Size
) -> torch.Tensor:
    """Inverses [M * K, ig, ig] of approximate diagonal blocks of the least-squares normal matrix.

    For fixed codes and scales, the block of codeword (m, k) is approximated by the sum over the
    groups (o, g) coded with it of scale_o^2 * H_gg (H_gg: the ig x ig diagonal block of XTX for
    input group g), the same for each of its out_group_size rows; the exact block also has the
    terms scale_o^2 * H_gg' of two groups g != g' of one output group sharing the codeword. Unused
    codewords get the identity, and a tiny ridge (relative to the trace) keeps singular blocks
    invertible, so the preconditioner is positive definite.
    """
    num_codebooks, codebook_size, _, in_group_size = codebooks_shape
    num_out_groups = scales.numel()
    num_in_groups = rows.shape[1] // num_out_groups
    diagonal = xtx.view(num_in_groups, in_group_size, num_in_groups, in_group_size).diagonal(dim1=0, dim2=2)
    diagonal = diagonal.permute(2, 0, 1).reshape(num_in_groups, in_group_size * in_group_size).double()
    squares = scales.detach().double().reshape(num_out_groups, 1).square().expand(-1, num_in_groups).reshape(-1)
    in_group = torch.arange(num_in_groups).repeat(num_out_groups)
    weights = torch.zeros(num_codebooks * codebook_size * num_in_groups, dtype=torch.float64)
    for m in range(num_codebooks):
        weights.index_add_(0, rows[m] * num_in_groups + in_group, squares)
    blocks = (weights.view(-1, num_in_groups) @ diagonal).view(-1, in_group_size, in_group_size)
    trace = blocks.diagonal(dim1=1, dim2=2).sum(dim=1).view(-1, 1, 1)
    eye = torch.eye(in_group_size, dtype=torch.float64)
    blocks = blocks + (1e-6 * trace / in_group_size) * eye + (trace <= 0) * eye
    return torch.linalg.inv(blocks).float()


def _lstsq_update(objective: LayerObjective, codes, codebooks, scales, config: LayerConfig) -> None:
    """Minimum over codebooks for fixed codes and scales (conjugate gradients on the normal
    equations, preconditioned by the inverse diagonal blocks of :func:`codeword_preconditioner`;
    each product one dequantize and one multiplication by H), then the closed-form optimal scale
    of every output group for the new codebooks.

    At most ``steps_per_epoch`` steps; with ``lstsq_tolerance``, the solve ends at the first step
    that lowers the relative error by less than that fraction of it. A step's decrease is
    alpha * r.z (exact for a quadratic), and the error at the start is
    (||W||_H^2 - b.x - r.x) / ||W||_H^2 for the right-hand side b and the residual r = b - A x.
    """
    rows = codeword_rows(codes, codebooks.shape[1])
    shape = codebooks.shape
    num_codebooks, codebook_size, out_group_size, in_group_size = shape
    gradient = CodewordSums(codes, shape, scales)  # once for every product of the solve (scales fixed)

    def apply(direction: torch.Tensor) -> torch.Tensor:
        return gradient(dequantize(codes, direction, scales.detach()).float() @ objective.xtx)

    with torch.no_grad():
        inverse = codeword_preconditioner(rows, scales, objective.xtx, shape)

        def precondition(residual: torch.Tensor) -> torch.Tensor:
            blocks = residual.view(num_codebooks * codebook_size, out_group_size, in_group_size)
            return (blocks @ inverse).view(shape)

        x = codebooks.detach().clone()
        rhs = gradient(objective.weight @ objective.xtx)
        r = rhs - apply(x)
        z = precondition(r)
        p = z.clone()
        rz = float((r * z).sum())
        start = rz
        error = (objective.reference - float((rhs * x).sum()) - float((r * x).sum())) / objective.reference
        for _ in range(max(config.steps_per_epoch, 1)):
            if rz <= 1e-12 * start or rz <= 0.0:
                break
            ap = apply(p)
            alpha = rz / max(float((p * ap).sum()), 1e-30)
            x += alpha * p
            r -= alpha * ap
            decrease = alpha * rz / objective.reference
            error -= decrease
            z = precondition(r)
            rz_next = float((r * z).sum())
            p = z + (rz_next / rz) * p
            rz = rz_next
            if config.lstsq_tolerance is not None and decrease < config.lstsq_tolerance * error:
                break
        codebooks.copy_(x)
        og = objective.out_group_size
        unscaled = dequantize(codes, codebooks, torch.ones_like(scales)).float()
        projected = unscaled @ objective.xtx
        numerator = (objective.weight * projected).sum(dim=1).view(-1, og).sum(dim=1)
        denominator = (unscaled * projected).sum(dim=1).view(-1, og).sum(dim=1)
        best = torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), scales.view(-1))
        scales.copy_(best.view_as(scales))


def quantize_weight(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    config: LayerConfig,
    layer_seed: int = 0,
    progress=None,
    timer: Optional[PhaseTimer] = None,
) -> LayerResult:
    """Quantize one weight [out, in] for the calibration statistics ``xtx`` [in, in].

    Alternates codebook/scale updates (codes fixed) and beam search (codebooks fixed) until the
    relative improvement of a round drops below ``config.relative_mse_tolerance``.
    ``progress``, if given, is called with (epoch, relative_error) after every round; ``timer``,
    if given, receives the time of k-means init, codebook updates, beam search and error checks.
    """
    started = time.perf_counter()
    scheme = config.scheme
    objective = LayerObjective(weight, xtx, scheme.out_group_size)
    init_config = LayerConfig(**{**config.__dict__, "seed": config.seed * 7919 + layer_seed})
    with maybe_phase(timer, "kmeans_init"):
        codes, codebooks, scales = init_quantized_weight(objective.weight, init_config)
    codebooks = codebooks.requires_grad_(True)
    scales = scales.requires_grad_(True)
    threads = _threads(config)
    with maybe_phase(timer, "output_check"):
        initial = best = objective.relative_error(codes, codebooks, scales)
    state: dict = {}
    epochs = 0
    for epoch in range(config.max_epochs):
        with maybe_phase(timer, "codebook_update"):
            if config.codebook_update == "adam":
                _adam_update(objective, codes, codebooks, scales, config, state)
            else:
                _lstsq_update(objective, codes, codebooks, scales, config)
        seed = (config.seed * 1000003 + layer_seed) * 1009 + epoch
        with maybe_phase(timer, "beam_search"):
            error = beam_search_codes(
                objective, codes, codebooks.detach(), scales.detach(), config.beam_size, seed, threads
            )
        epochs = epoch + 1
        if progress is not None:
            progress(epochs, error)
        improved = (best - error) / best if best > 0 else 0.0
        best = min(best, error)
        if config.relative_mse_tolerance is not None and improved < config.relative_mse_tolerance:
            break
    with maybe_phase(timer, "output_check"):
        final = objective.relative_error(codes, codebooks, scales)
    if not math.isfinite(final):
        raise ValueError(f"quantization diverged: relative error {final}")
    return LayerResult(
        codes=codes,
        codebooks=codebooks.detach(),
        scales=scales.detach(),
        initial_error=initial,
        final_error=final,
        epochs=epochs,
        seconds=time.perf_counter() - started,
        threads=_threads(config),
    )


def reference_error(weight: torch.Tensor, xtx: torch.Tensor, codes, codebooks, scales) -> float:
    """Relative output error by the pure-torch formula (for checks)."""
    delta = weight.double() - dequantize_reference(codes, codebooks, scales).double()
    return float((delta @ xtx.double() * delta).sum() / (weight.double() @ xtx.double() * weight.double()).sum())
