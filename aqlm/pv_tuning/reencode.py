"""The V step's re-encoder: move AQLM codes towards a continuous target weight, within a subspace.

Given a target ``W_ref`` (a straight-through buffer, or the de-quantized weight after a
continuous optimizer step), the codes are re-chosen by the C beam search with the plain L2
objective ``||W_ref - What||^2`` (``xtx=None``), but only a subspace of code groups may change:

1. the priority of a group ``(o, j)`` (one output group x one input group, all its codebooks) is
   ``||W_ref - What||^2`` over the weights it covers;
2. ``ceil(max_change_fraction * num_groups)`` groups are selected: the largest priorities
   (``selection_temperature == 0``), or sampled without replacement with probabilities
   proportional to ``priority ** (0.5 / selection_temperature)`` (i.e. to the non-squared norm
   raised to ``1 / temperature``);
3. one beam-search pass re-encodes the selected groups (all others are kept);
4. with ``trust_ratio``, the changes are kept only for the longest prefix of the selected groups
   (in selection order) whose cumulative change ``||What_new - What_prev||`` stays within
   ``trust_ratio * ||What_prev||``, plus one group more, so that at least one group may change.

The result carries the de-quantized weight of the new codes, so the caller need not de-quantize
again: without ``trust_ratio`` it is de-quantized once from the new codes; with it, it is put
together from the two weights step 4 de-quantized anyway (new tiles where changes are kept,
previous ones elsewhere), which is exact because every weight tile depends only on its group's
codes. A V step thus de-quantizes each layer twice: the previous weight (for the selection
and the search's residual) and the new one.

This follows ``beam_search_optimal_codes`` in upstream AQLM's ``src/beam_search_l2.py``. The
search minimises the scaled error ``s_o^2 ||W_ref / s_o - C||^2`` of each group where upstream
divides the reference by the scales first; both have the same minimiser per group.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..ops import beam_search, check_weight, dequantize
from .sharding import RowShard


@dataclass
class ReencodeResult:
    """New codes (packed, same shape and dtype as the old ones), their float32 de-quantized weight, and what changed."""

    codes: torch.Tensor
    weight: torch.Tensor
    changed_groups: int
    total_groups: int
    allowed_groups: int

    @property
    def changed_fraction(self) -> float:
        """Fraction of code groups with at least one code changed."""
        return self.changed_groups / max(self.total_groups, 1)


def groupwise_squared_norms(delta: torch.Tensor, out_group_size: int, in_group_size: int) -> torch.Tensor:
    """``[num_out_groups, num_in_groups]`` sums of squares of ``delta`` over each code group's tile."""
    out_features, in_features = delta.shape
    tiles = delta.float().view(
        out_features // out_group_size, out_group_size, in_features // in_group_size, in_group_size
    )
    return tiles.square().sum(dim=(1, 3))


def select_code_groups(
    priority: torch.Tensor,
    fraction: float,
    temperature: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Flat indices of the ``ceil(fraction * priority.numel())`` code groups to re-encode, most important first.

    ``priority`` holds squared norms. With ``temperature == 0`` the largest are taken (sorted);
    otherwise they are sampled without replacement proportionally to ``priority ** (0.5 / temperature)``
    using ``generator``. Groups of zero priority are sampled only after all others.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"the fraction of code groups to update must be in (0, 1], got {fraction}")
    if temperature < 0:
        raise ValueError(f"code_selection_temperature must be >= 0, got {temperature}")
    flat = priority.reshape(-1).float()
    count = min(flat.numel(), int(math.ceil(fraction * flat.numel())))
    if temperature == 0:
        return torch.topk(flat, k=count, largest=True, sorted=True).indices
    peak = float(flat.max()) if flat.numel() else 0.0
    if not peak > 0 or not math.isfinite(peak):
        weights = torch.ones_like(flat)
    else:
        weights = (flat / peak).clamp_min(0).pow(0.5 / temperature)
        weights = weights.clamp_min(torch.finfo(torch.float32).tiny)
    return torch.multinomial(weights, num_samples=count, replacement=False, generator=generator)


def reencode_codes(
    reference: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    *,
    max_change_fraction: float = 1.0,
    selection_temperature: float = 0.0,
    trust_ratio: Optional[float] = None,
    beam_size: int = 1,
    generator: Optional[torch.Generator] = None,
    num_threads: Optional[int] = None,
    shard: Optional[RowShard] = None,
) -> ReencodeResult:
    """Codes that bring the de-quantized weight closer to ``reference`` in L2, changing only a subspace.

    Args:
        reference: target weight ``[out_features, in_features]``, or its rows ``shard.rows``.
        codes: current packed codes ``[num_out_groups, num_in_groups, num_codebooks]`` (not modified).
        codebooks, scales: the (current) continuous parameters; used as they are, not updated.
        max_change_fraction: at most this fraction of code groups (rounded up) may change.
        selection_temperature: 0 picks the groups farthest from ``reference``; > 0 samples them.
        trust_ratio: if set, ``||What_new - What_prev|| <= trust_ratio * ||What_prev||`` is enforced
            by undoing the changes of the least important selected groups (one group may exceed it).
        beam_size: hypotheses per output group in the beam search.
        generator: random source for the sampled selection.
        num_threads: C threads (default ``torch.get_num_threads()``).
        shard: with FSDP (:mod:`aqlm.pv_tuning.sharding`), the weight rows that this process holds
            and re-encodes; every process must call this with the same codes, codebooks, scales and
            generator state. The selection and the trust-ratio cut are made from gathered per-group
            norms, and the new codes gathered, so that every process returns the same codes.

    Returns:
        A :class:`ReencodeResult` with new packed codes (whole) and their de-quantized weight (float32;
        the rows ``shard.rows`` with ``shard``), bit for bit ``dequantize(codes, codebooks, scales)``
        in float32.
    """
    check_weight(codes, codebooks, scales)
    if not 0 < max_change_fraction <= 1:
        raise ValueError(f"max_code_change_per_step must be in (0, 1], got {max_change_fraction}")
    if codes.device.type != "cpu":
        raise ValueError(f"re-encoding runs on the CPU, got codes on {codes.device}")
    if trust_ratio is not None and not trust_ratio > 0:
        raise ValueError(f"code_trust_ratio must be positive, got {trust_ratio}")
    if not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive integer, got {beam_size!r}")
    num_codebooks, _, out_group_size, in_group_size = codebooks.shape
    num_out_groups, num_in_groups, _ = codes.shape
    shape = (num_out_groups * out_group_size, num_in_groups * in_group_size)
    shard = shard or RowShard.all_of(shape[0])
    if shard.total != shape[0]:
        raise ValueError(f"the shard covers a weight of {shard.total} rows, the codes one of {shape[0]}")
    groups = shard.in_groups(out_group_size)
    local_shape = (shard.stop - shard.start, shape[1])
    if tuple(reference.shape) != local_shape:
        what = "the weight's shape" if not shard.distributed else f"the shape of its rows {shard.start}:{shard.stop}"
        raise ValueError(f"reference must have {what} {local_shape}, got {tuple(reference.shape)}")
    if not torch.isfinite(reference).all():
        raise ValueError("the reference weight for re-encoding contains NaN or Inf")

    codebooks32 = codebooks.detach().float().contiguous()
    scales32 = scales.detach().float().reshape(-1)[groups.rows].contiguous()
    local_codes = codes.detach()[groups.rows]
    previous = dequantize(local_codes, codebooks32, scales32.view(-1, 1, 1, 1)).float()
    target = reference.detach().float()
    local_groups = local_codes.shape[0] * num_in_groups
    total = num_out_groups * num_in_groups

    order: Optional[torch.Tensor] = None
    allowed = None
    if max_change_fraction < 1 or trust_ratio is not None:
        priority = groups.gather(groupwise_squared_norms(target - previous, out_group_size, in_group_size))
        order = select_code_groups(priority, max_change_fraction, selection_temperature, generator)
        allowed = torch.zeros(total, dtype=torch.uint8)
        allowed[order] = 1
        allowed = allowed.view(num_out_groups, num_in_groups)[groups.rows].contiguous()

    new_codes = local_codes.clone().contiguous()
    residual = (target - previous).contiguous()
    losses = residual.double().square().sum(dim=1).view(-1, out_group_size).sum(dim=1).contiguous()
    if local_groups:
        beam_search(
            None,
            codebooks32,
            scales32,
            new_codes,
            residual,
            losses,
            allowed=allowed,
            beam_size=beam_size,
            shuffle=False,
            seed=0,
            num_threads=num_threads or torch.get_num_threads(),
        )

    weight = dequantize(new_codes, codebooks32, scales32.view(-1, 1, 1, 1)).float()
    if trust_ratio is not None:
        change = groups.gather(groupwise_squared_norms(weight - previous, out_group_size, in_group_size))
        change = change.reshape(-1)[order]
        cumulative = change.double().cumsum(0).sqrt()
        previous_norm = math.sqrt(float(groups.sum(previous.double().square().sum())))
        limit = torch.tensor(trust_ratio * previous_norm, dtype=torch.float64)
        keep = 1 + int(torch.searchsorted(cumulative, limit, side="left"))
        kept_groups = torch.zeros(total, dtype=torch.bool)
        kept_groups[order[:keep]] = True
        kept_groups = kept_groups.view(num_out_groups, num_in_groups)[groups.rows]
        new_codes = torch.where(kept_groups.unsqueeze(-1), new_codes, local_codes).contiguous()
        tiles = kept_groups.view(-1, 1, num_in_groups, 1)
        weight = torch.where(
            tiles, weight.view(-1, out_group_size, num_in_groups, in_group_size),
            previous.view(-1, out_group_size, num_in_groups, in_group_size),
        ).view(local_shape)

    new_codes = groups.gather(new_codes)
    changed = int(torch.ne(new_codes, codes).any(dim=-1).sum())
    return ReencodeResult(
        codes=new_codes,
        weight=weight,
        changed_groups=changed,
        total_groups=total,
        allowed_groups=total if order is None else int(order.numel()),
    )
