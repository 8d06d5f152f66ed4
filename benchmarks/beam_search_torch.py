"""Beam search over AQLM codes in pure torch: the baseline the C core (`aqlm._C.beam_search`) is
measured against, and a second implementation to check it by.

It minimises the same objective as the C core, for every output group o
    loss[o] = sum over its rows r of (W - What)[r] XTX (W - What)[r]^T,
visiting input groups j (and codebooks m within each) in the same order, with the same rules: a
code changes only if that strictly lowers the loss (beam 1), hypotheses are ranked by (loss,
source hypothesis, code), groups with scale 0 or ``allowed == 0`` keep their codes, and the result
replaces the given codes only if strictly better.

The computation is organised like upstream AQLM's ``src/beam_search_xtx.py``: one step per (j, m)
over all output groups at once as dense tensor ops. Per step, the residual with code (j, m) removed
is projected, ``P = (W - What + s C[m, old]) XTX[:, block j]``, and every codeword c of codebook m
is scored for every output group and hypothesis as
    loss(c) = const - 2 s <C[m, c], P> + s^2 C[m, c] XTX_jj C[m, c]^T
            = const + s^2 (norm[c] + <q, C[m, c]>),   q = -2 P / s,
a [hypotheses, groups, K] tensor from one matmul-add, reduced by min/top-k (the s^2 factor is
applied only to the winners; upstream forms the dot products, scales and subtracts them as
separate passes, which costs 2-3x more for 2**16-entry codebooks). Hypotheses are dense residual
matrices [beam, out, in]. Unlike the C core, which runs every step for a small tile of output groups while
their rows stay in cache, each step here streams the whole residual.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from aqlm.format import check_code_range, nbits_of, pack_codes, unpack_codes

_MASK64 = (1 << 64) - 1


class _SplitMix64:
    """The C core's seeded generator (splitmix64), so Python can reproduce its shuffled order."""

    def __init__(self, seed: int):
        self.state = seed & _MASK64

    def next(self) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        return z ^ (z >> 31)

    def below(self, bound: int) -> int:
        return (self.next() * bound) >> 64

    def shuffle(self, values: list) -> None:
        for i in range(len(values) - 1, 0, -1):
            j = self.below(i + 1)
            values[i], values[j] = values[j], values[i]


def visiting_order(
    num_in_groups: int, num_codebooks: int, shuffle: bool = False, seed: int = 0
) -> tuple[list[int], torch.Tensor]:
    """The order in which ``_C.beam_search(..., shuffle=shuffle, seed=seed)`` visits the codes:
    (input groups in visiting order, codebook order [num_in_groups, num_codebooks] indexed by the
    input group itself)."""
    rng = _SplitMix64(seed)
    groups = list(range(num_in_groups))
    if shuffle:
        rng.shuffle(groups)
    codebook_order = []
    for _ in range(num_in_groups):
        order = list(range(num_codebooks))
        if shuffle:
            rng.shuffle(order)
        codebook_order.append(order)
    return groups, torch.tensor(codebook_order, dtype=torch.int64).view(num_in_groups, num_codebooks)


def _check_arguments(
    weight: torch.Tensor,
    xtx: Optional[torch.Tensor],
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    beam_size: int,
    allowed: Optional[torch.Tensor],
    group_order: Optional[Sequence[int]],
    codebook_order: Optional[torch.Tensor],
) -> int:
    """Shapes and values, with the offending ones in the message; returns nbits."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be [out_features, in_features], got shape {tuple(weight.shape)}")
    nbits = nbits_of(codebooks)
    num_codebooks, _, out_group_size, in_group_size = codebooks.shape
    out_features, in_features = weight.shape
    if out_features % out_group_size or in_features % in_group_size:
        raise ValueError(
            f"group sizes {out_group_size}x{in_group_size} do not divide the weight shape {tuple(weight.shape)}"
        )
    expected = (out_features // out_group_size, in_features // in_group_size, num_codebooks)
    if tuple(codes.shape) != expected:
        raise ValueError(f"codes must have shape {expected}, got {tuple(codes.shape)}")
    if codes.is_floating_point():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    check_code_range(codes.to(torch.int64), nbits)  # packed [-K/2, K) or plain [0, K) values
    if xtx is not None and tuple(xtx.shape) != (in_features, in_features):
        raise ValueError(f"xtx must have shape {(in_features, in_features)}, got {tuple(xtx.shape)}")
    if scales.numel() != expected[0]:
        raise ValueError(f"scales must have one value per output group ({expected[0]}), got {scales.numel()}")
    if allowed is not None and tuple(allowed.shape) != expected[:2]:
        raise ValueError(f"allowed must have shape {expected[:2]}, got {tuple(allowed.shape)}")
    if not 1 <= beam_size <= 256:
        raise ValueError(f"beam_size must be in [1, 256], got {beam_size}")
    if group_order is not None and sorted(group_order) != list(range(expected[1])):
        raise ValueError(f"group_order must be a permutation of range({expected[1]})")
    if codebook_order is not None and tuple(codebook_order.shape) != expected[1:]:
        raise ValueError(f"codebook_order must have shape {expected[1:]}, got {tuple(codebook_order.shape)}")
    for name, tensor in (("weight", weight), ("xtx", xtx), ("codebooks", codebooks), ("scales", scales)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"beam search input {name} has NaN or Inf values")
    return nbits


class _Step:
    """What one (input group j, codebook m) step shares across hypotheses and output groups."""

    def __init__(self, xtx: torch.Tensor, codebooks: torch.Tensor, j: int, m: int):
        _, K, og, ig = codebooks.shape
        self.columns = slice(j * ig, (j + 1) * ig)
        self.xtx_columns = xtx[self.columns].T  # XTX[:, block j] by symmetry, from contiguous rows
        self.xtx_block = xtx[self.columns, self.columns]
        self.words = codebooks[m]  # [K, og, ig]
        self.flat_words = self.words.reshape(K, og * ig)
        self.norms = ((self.words @ self.xtx_block) * self.words).sum(dim=(1, 2))  # [K]


def _candidate_scores(
    step: _Step, residual: torch.Tensor, old: torch.Tensor, scales: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """For hypotheses [..., n groups]: scores [..., n, K] and a constant [..., n] in float64 such that
    loss(c) = constant + scales**2 * scores[c] (rows with scale 0 get meaningless scores).

    residual: [..., n, og, in] rows of W - What; old: [..., n] current codes; scales: [n]."""
    old_words = step.words[old]  # [..., n, og, ig]
    s = scales.view(-1, 1, 1)
    projected = residual @ step.xtx_columns + (s * old_words) @ step.xtx_block  # [..., n, og, ig]
    flat = projected.flatten(-2)
    query = flat * (-2.0 / torch.where(s == 0, 1.0, s).view(-1, 1))
    scores = torch.addmm(step.norms, query.reshape(-1, query.shape[-1]), step.flat_words.T)
    s64 = scales.double()
    constant = 2 * s64 * (old_words.flatten(-2) * flat).sum(-1).double() - s64**2 * step.norms[old].double()
    return scores.view(*query.shape[:-1], -1), constant


def _greedy(
    residual: torch.Tensor,
    losses: torch.Tensor,
    xtx: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    searchable: torch.Tensor,
    group_order: Sequence[int],
    codebook_order: torch.Tensor,
    chunk: int,
) -> None:
    """Beam size 1: coordinate descent in place on the residual W - What [out, in], the losses [OG]
    and the codes [OG, G, M] (int64)."""
    og = codebooks.shape[2]
    num_out_groups, _, M = codes.shape
    rows = residual.view(num_out_groups, og, -1)
    for j in group_order:
        for mm in range(M):
            m = int(codebook_order[j, mm])
            step = _Step(xtx, codebooks, j, m)
            for o0 in range(0, num_out_groups, chunk):
                o1 = min(o0 + chunk, num_out_groups)
                old = codes[o0:o1, j, m]
                scores, constant = _candidate_scores(step, rows[o0:o1], old, scales[o0:o1])
                best_score, best = scores.min(dim=-1)
                loss = losses[o0:o1] + constant + scales[o0:o1].double() ** 2 * best_score.double()
                accept = searchable[o0:o1, j] & (best != old) & (loss < losses[o0:o1])
                if not bool(accept.any()):
                    continue
                index = accept.nonzero().squeeze(1)
                groups = index + o0
                new, previous = best[index], old[index]
                losses[groups] = loss[index]
                codes[groups, j, m] = new
                delta = scales[groups].view(-1, 1, 1) * (step.words[new] - step.words[previous])
                rows[groups, :, step.columns] -= delta


def _beam(
    residual: torch.Tensor,
    losses: torch.Tensor,
    xtx: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    searchable: torch.Tensor,
    group_order: Sequence[int],
    codebook_order: torch.Tensor,
    chunk: int,
    beam_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Beam size > 1 from the residual W - What [out, in] and losses [OG] of codes [OG, G, M];
    hypotheses are dense residuals [B, OG, og, in]. Returns the best hypothesis (codes, losses)."""
    _, K, og, _ = codebooks.shape
    num_out_groups, _, M = codes.shape
    beam = min(beam_size, K)
    groups = torch.arange(num_out_groups)
    residual = residual.view(1, num_out_groups, og, -1)
    hypothesis_codes = codes.unsqueeze(0).clone()  # [B, OG, G, M]
    hypothesis_losses = losses.unsqueeze(0)  # [B, OG]
    for j in group_order:
        for mm in range(M):
            m = int(codebook_order[j, mm])
            step = _Step(xtx, codebooks, j, m)
            count = hypothesis_codes.shape[0]
            old = hypothesis_codes[:, :, j, m]  # [B, OG]
            candidate_losses = torch.empty(count, num_out_groups, beam, dtype=torch.float64)
            candidate_codes = torch.empty(count, num_out_groups, beam, dtype=torch.int64)
            for o0 in range(0, num_out_groups, max(1, chunk // count)):
                o1 = min(o0 + max(1, chunk // count), num_out_groups)
                scores, constant = _candidate_scores(step, residual[:, o0:o1], old[:, o0:o1], scales[o0:o1])
                values, picked = scores.topk(beam, dim=-1, largest=False)
                candidate_codes[:, o0:o1] = picked
                start = hypothesis_losses[:, o0:o1] + constant
                s2 = scales[o0:o1].double().view(-1, 1) ** 2
                candidate_losses[:, o0:o1] = start.unsqueeze(-1) + s2 * values.double()
            kept = candidate_codes == old.unsqueeze(-1)
            candidate_losses = torch.where(kept, hypothesis_losses.unsqueeze(-1), candidate_losses)
            frozen = ~searchable[:, j]  # these groups keep every hypothesis as it is
            candidate_codes[:, frozen] = old[:, frozen].unsqueeze(-1)
            candidate_losses[:, frozen, 1:] = torch.inf
            candidate_losses[:, frozen, 0] = hypothesis_losses[:, frozen]
            # rank by (loss, source hypothesis, code): codes ascending within a source, then a stable sort
            by_code = candidate_codes.argsort(dim=-1, stable=True)
            candidate_codes = candidate_codes.gather(-1, by_code)
            candidate_losses = candidate_losses.gather(-1, by_code)
            flat_losses = candidate_losses.permute(1, 0, 2).reshape(num_out_groups, count * beam)
            flat_codes = candidate_codes.permute(1, 0, 2).reshape(num_out_groups, count * beam)
            ranked_losses, ranked = torch.sort(flat_losses, dim=1, stable=True)
            new_losses, chosen = ranked_losses[:, :beam], ranked[:, :beam]  # [OG, beam]
            source = (chosen // beam).T  # [beam, OG]
            new_codes = flat_codes.gather(1, chosen).T
            residual = residual[source, groups]
            hypothesis_codes = hypothesis_codes[source, groups]
            previous = hypothesis_codes[:, :, j, m]
            changed = (new_codes != previous) & torch.isfinite(new_losses.T)
            delta = scales.view(1, -1, 1, 1) * (step.words[new_codes] - step.words[previous])
            residual[:, :, :, step.columns] -= delta * changed.view(beam, num_out_groups, 1, 1)
            hypothesis_codes[:, :, j, m] = torch.where(changed, new_codes, previous)
            hypothesis_losses = new_losses.T.contiguous()
    return hypothesis_codes[0], hypothesis_losses[0]


def _dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dense What [out, in] from unpacked int64 codes, in the codebooks' dtype."""
    num_out_groups, num_in_groups, M = codes.shape
    _, K, og, ig = codebooks.shape
    table = codebooks.reshape(M * K, og * ig)
    blocks = table[codes + torch.arange(M) * K].sum(dim=2).view(num_out_groups, num_in_groups, og, ig)
    blocks = blocks * scales.view(-1, 1, 1, 1)
    return blocks.transpose(1, 2).reshape(num_out_groups * og, num_in_groups * ig)


def _losses(residual: torch.Tensor, xtx: torch.Tensor, og: int) -> torch.Tensor:
    """Per-output-group loss sum_r R[r] XTX R[r]^T, accumulated in float64."""
    return ((residual @ xtx) * residual).double().sum(dim=1).view(-1, og).sum(dim=1)


@torch.inference_mode()
def beam_search_torch(
    weight: torch.Tensor,
    xtx: Optional[torch.Tensor],
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    *,
    beam_size: int = 1,
    allowed: Optional[torch.Tensor] = None,
    group_order: Optional[Sequence[int]] = None,
    codebook_order: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
    max_scores: int = 1 << 24,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One beam-search pass, the pure-torch twin of ``aqlm._C.beam_search``.

    Args:
        weight: the layer weight W [out, in].
        xtx: X^T X [in, in] (symmetric positive semi-definite), or None for the identity.
        codebooks: [M, K, og, ig]; scales: one per output group [out/og].
        codes: starting codes [out/og, in/ig, M], packed (int8/int16) or plain integers in [0, K).
        beam_size: hypotheses kept per output group (1 = greedy coordinate descent).
        allowed: [out/og, in/ig] bool or None; codes of groups with allowed == 0 are kept.
        group_order: input groups in visiting order (default natural; :func:`visiting_order`
            reproduces the C core's shuffled order).
        codebook_order: [in/ig, M] order of codebooks within each input group (default natural).
        compute_dtype: dtype of the dense tensor work (losses are always accumulated in float64).
        max_scores: at most this many candidate scores (hypotheses x groups x K) at once; output
            groups are independent, so chunking them changes no result.

    Returns:
        (codes [out/og, in/ig, M] in the packed storage dtype, losses [out/og] float64).
    """
    nbits = _check_arguments(weight, xtx, codebooks, scales, codes, beam_size, allowed, group_order, codebook_order)
    num_out_groups, num_in_groups, M = codes.shape
    K, og = codebooks.shape[1], codebooks.shape[2]
    weight = weight.detach().to(compute_dtype)
    h = torch.eye(weight.shape[1], dtype=compute_dtype) if xtx is None else xtx.detach().to(compute_dtype).contiguous()
    codebooks = codebooks.detach().to(compute_dtype).contiguous()
    scales = scales.detach().to(compute_dtype).reshape(-1)
    plain = unpack_codes(codes, nbits) if codes.dtype in (torch.int8, torch.int16) else codes.to(torch.int64)
    searchable = (scales != 0).view(-1, 1).expand(num_out_groups, num_in_groups)
    if allowed is not None:
        searchable = searchable & (allowed != 0)
    group_order = list(range(num_in_groups)) if group_order is None else [int(j) for j in group_order]
    if codebook_order is None:
        codebook_order = torch.arange(M).expand(num_in_groups, M)
    chunk = max(1, max_scores // K)
    residual = weight - _dequantize(plain, codebooks, scales)
    start_losses = _losses(residual, h, og)
    order = (searchable, group_order, codebook_order, chunk)
    if beam_size == 1 or K == 1:
        result, losses = plain.clone(), start_losses.clone()
        _greedy(residual, losses, h, codebooks, scales, result, *order)
    else:
        result, losses = _beam(residual, start_losses, h, codebooks, scales, plain, *order, beam_size)
        better = losses < start_losses
        result = torch.where(better.view(-1, 1, 1), result, plain)
        losses = torch.where(better, losses, start_losses)
    return pack_codes(result, nbits), losses
