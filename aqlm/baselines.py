"""Scalar-quantization baselines at a given bit width: round-to-nearest (RTN) and GPTQ.

Both use the same grid as the GPTQ reference implementation (IST-DASLab/gptq, ``quant.py``):
for each output row and each group of ``group_size`` consecutive input features, an asymmetric
uniform grid with ``2**bits`` levels, ``scale = (xmax - xmin) / (2**bits - 1)`` and an integer
zero point ``zero = round(-xmin / scale)``, where ``xmin = min(0, min w)`` and
``xmax = max(0, max w)`` (the range always contains 0; an all-zero group gets ``[-1, 1]``). A
weight ``w`` becomes ``scale * (clamp(round(w / scale) + zero, 0, 2**bits - 1) - zero)``. The
last group of a row is shorter when ``group_size`` does not divide the number of input features.

The functions return dequantized weights ("fake quantization"): the point is to measure the
quality of a bit budget on the same data and with the same evaluation code as AQLM.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Dict, Iterable, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .calibration import capture_block_inputs, find_linears, get_blocks, run_block


@dataclass
class QuantizationReport:
    """What a model-level baseline did.

    Attributes:
        method: ``"rtn"`` or ``"gptq"``.
        bits, group_size: the grid.
        bits_per_weight: :func:`rtn_bits_per_weight` with 16-bit scales and zero points.
        layer_errors: per quantized linear (full module name), GPTQ: the relative squared output
            error on its calibration inputs, ``tr(dW H dW^T) / tr(W H W^T)`` with ``H = X^T X``;
            RTN (no data): the relative squared weight error ``|dW|^2 / |W|^2``.
        seconds: wall-clock time of the whole call.
    """

    method: str
    bits: int
    group_size: int
    bits_per_weight: float
    layer_errors: Dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _check_grid(bits: int, group_size: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")


def _check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a floating-point [out_features, in_features] matrix, got {shape}")


def _group_params(group: torch.Tensor, maxq: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` of shape ``[rows, 1]`` for the columns in ``group``."""
    zeros = torch.zeros(group.shape[0], dtype=group.dtype, device=group.device)
    xmin = torch.minimum(group.min(dim=1).values, zeros)
    xmax = torch.maximum(group.max(dim=1).values, zeros)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.round(-xmin / scale)
    return scale[:, None], zero[:, None]


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return scale * (torch.clamp(torch.round(x / scale) + zero, 0, maxq) - zero)


def rtn_bits_per_weight(bits: int, group_size: int, param_bits: int = 16) -> float:
    """Storage cost per weight: ``bits`` plus one scale and one zero point of ``param_bits`` per group."""
    _check_grid(bits, group_size)
    return bits + 2 * param_bits / group_size


def rtn_quantize_weight(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize ``weight`` ``[out, in]`` per row and group of input features.

    See the module docstring for the grid. Computed in float32; returned in ``weight``'s dtype.
    """
    _check_weight(weight)
    _check_grid(bits, group_size)
    maxq = 2**bits - 1
    source = weight.detach().float()
    result = torch.empty_like(source)
    for start in range(0, source.shape[1], group_size):
        group = source[:, start : start + group_size]
        scale, zero = _group_params(group, maxq)
        result[:, start : start + group_size] = _fake_quantize(group, scale, zero, maxq)
    return result.to(weight.dtype)


def relative_output_error(weight: torch.Tensor, quantized: torch.Tensor, xtx: torch.Tensor) -> float:
    """``tr(dW H dW^T) / tr(W H W^T)`` for ``dW = quantized - weight`` and ``H = xtx`` (in float64).

    With ``H = X^T X`` this is ``|X dW^T|^2 / |X W^T|^2``, the relative squared error of the
    layer's outputs on the inputs ``X``.
    """
    weight, xtx = weight.detach().double(), xtx.detach().double()
    delta = quantized.detach().double() - weight
    denominator = float(((weight @ xtx) * weight).sum())
    return float(((delta @ xtx) * delta).sum()) / denominator if denominator > 0 else 0.0


def gptq_quantize_weight(
    weight: torch.Tensor,
    xtx: torch.Tensor,
    bits: int,
    group_size: int,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> torch.Tensor:
    """GPTQ (Frantar et al., 2022) quantize-dequantize of ``weight`` ``[out, in]`` given ``xtx = X^T X`` ``[in, in]``.

    The algorithm of the reference implementation (``GPTQ.fasterquant``, non-static groups):

    - inputs that never fire (``H[j, j] == 0``) get ``H[j, j] = 1`` and their weights are zeroed;
    - with ``act_order``, columns are processed by decreasing ``H[j, j]`` (the permutation is
      undone on the result; groups are then runs of ``group_size`` columns in that order);
    - ``H += percdamp * mean(diag H) * I``; ``U`` is the upper Cholesky factor of ``H^-1``;
    - columns are quantized left to right; the error of column ``j``, divided by ``U[j, j]``,
      is spread over the columns to its right through row ``j`` of ``U``, immediately within a
      block of ``block_size`` columns and lazily (one matrix product per block) beyond it;
    - when a group starts, its scale and zero point are computed (min-max, as in RTN) from the
      current, error-compensated values of its columns and then kept for the whole group.

    The reference reads the group's columns from the matrix that holds only the updates of
    previous *blocks*; here the updates of the current block are included too, which changes
    nothing when ``group_size`` is a multiple of ``block_size`` (e.g. both 128).

    With ``xtx`` diagonal and ``act_order=False`` no error is spread, and the result equals
    :func:`rtn_quantize_weight` exactly. Computed in float32 (``H^-1`` in float64); returned in
    ``weight``'s dtype.
    """
    _check_weight(weight)
    _check_grid(bits, group_size)
    columns = weight.shape[1]
    if not isinstance(xtx, torch.Tensor) or xtx.shape != (columns, columns):
        shape = tuple(xtx.shape) if isinstance(xtx, torch.Tensor) else type(xtx).__name__
        raise ValueError(f"xtx must be a [{columns}, {columns}] matrix for a weight with {columns} inputs, got {shape}")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    if not percdamp >= 0:
        raise ValueError(f"percdamp must be >= 0, got {percdamp!r}")
    maxq = 2**bits - 1
    W = weight.detach().float().clone()
    H = xtx.detach().to(device=W.device, dtype=torch.float64).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(percdamp * torch.diag(H).mean())
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()

    Q = torch.zeros_like(W)
    scale = zero = None
    for i1 in range(0, columns, block_size):
        i2 = min(i1 + block_size, columns)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            if column % group_size == 0:
                group_end = min(column + group_size, columns)
                current = W1[:, i : min(group_end, i2) - i1]
                if group_end > i2:
                    pending = W[:, i2:group_end] - Err1 @ Hinv[i1:i2, i2:group_end]
                    current = torch.cat([current, pending], dim=1)
                scale, zero = _group_params(current, maxq)
            w = W1[:, i]
            q = _fake_quantize(w[:, None], scale, zero, maxq).flatten()
            Q[:, column] = q
            error = (w - q) / Hinv1[i, i]
            W1[:, i:] -= error[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = error
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    if act_order:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(weight.dtype)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == pattern or name.endswith("." + pattern) for pattern in skip)


def _block_prefix(model: nn.Module, blocks: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is blocks:
            return name
    raise ValueError("the blocks are not submodules of the model")


def quantize_model_rtn(
    model: nn.Module,
    bits: int,
    group_size: int,
    skip: Iterable[str] = ("lm_head",),
    progress: bool = True,
) -> QuantizationReport:
    """Replace, in place, the weight of every ``nn.Linear`` of ``model`` by its RTN quantization.

    Linears whose qualified name equals an entry of ``skip`` or ends with ``"." + entry`` stay
    dense, as do embeddings (they are not linears).
    """
    _check_grid(bits, group_size)
    skip = tuple(skip)
    started = time.perf_counter()
    report = QuantizationReport("rtn", bits, group_size, rtn_bits_per_weight(bits, group_size))
    linears = {name: linear for name, linear in find_linears(model).items() if not _skipped(name, skip)}
    for name, linear in tqdm(linears.items(), desc=f"RTN {bits}-bit", disable=not progress):
        weight = linear.weight.data
        quantized = rtn_quantize_weight(weight, bits, group_size)
        squared_norm = weight.double().square().sum()
        report.layer_errors[name] = float((quantized.double() - weight.double()).square().sum() / squared_norm)
        weight.copy_(quantized)
    report.seconds = time.perf_counter() - started
    return report


class _XtxAccumulator:
    """Sums ``X^T X`` of a linear's inputs over all calls; linears fed the same tensor share the product."""

    def __init__(self, columns: int, device: torch.device, shared: Dict[str, object]):
        self.sum = torch.zeros(columns, columns, dtype=torch.float64, device=device)
        self.rows = 0
        self.shared = shared

    def __call__(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        inputs = args[0]
        if self.shared.get("input") is not inputs:
            flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
            self.shared.update(input=inputs, product=flat.T @ flat, rows=flat.shape[0])
        self.sum += self.shared["product"]
        self.rows += self.shared["rows"]

    def xtx(self) -> torch.Tensor:
        return self.sum / max(self.rows, 1)


def quantize_model_gptq(
    model: nn.Module,
    windows: torch.Tensor,
    bits: int,
    group_size: int,
    batch_size: int = 1,
    percdamp: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    skip: Iterable[str] = ("lm_head",),
    progress: bool = True,
) -> QuantizationReport:
    """GPTQ-quantize, in place, the linears of every block of ``model`` on calibration ``windows`` ``[n, seqlen]``.

    Sequential over :func:`aqlm.calibration.get_blocks`, as in the GPTQ paper: the inputs of
    block 0 are captured once; for each block, ``X^T X / tokens`` of every linear is collected in
    one pass of the still-dense block (all its linears see dense inputs, the reference's default
    without ``--true-sequential``), every linear is quantized with :func:`gptq_quantize_weight`,
    and the *quantized* block is run again to produce the next block's inputs. ``lm_head``,
    embeddings and norms stay dense; linears named in ``skip`` (as in
    :func:`quantize_model_rtn`) too.
    """
    _check_grid(bits, group_size)
    skip = tuple(skip)
    started = time.perf_counter()
    report = QuantizationReport("gptq", bits, group_size, rtn_bits_per_weight(bits, group_size))
    blocks = get_blocks(model)
    prefix = _block_prefix(model, blocks)
    inputs, block_kwargs = capture_block_inputs(model, windows, batch_size=batch_size, progress=progress)
    outputs = torch.empty_like(inputs)
    for index, block in enumerate(tqdm(blocks, desc=f"GPTQ {bits}-bit blocks", disable=not progress)):
        linears = {
            f"{prefix}.{index}.{name}": linear
            for name, linear in find_linears(block).items()
            if not _skipped(f"{prefix}.{index}.{name}", skip)
        }
        shared: Dict[str, object] = {}
        accumulators = {
            name: _XtxAccumulator(linear.in_features, linear.weight.device, shared) for name, linear in linears.items()
        }
        handles = [linear.register_forward_hook(accumulators[name]) for name, linear in linears.items()]
        try:
            run_block(block, inputs, block_kwargs, batch_size=batch_size, out=outputs)
        finally:
            for handle in handles:
                handle.remove()
        shared.clear()
        for name, linear in linears.items():
            xtx = accumulators[name].xtx()
            weight = linear.weight.data
            quantized = gptq_quantize_weight(weight, xtx, bits, group_size, percdamp, block_size, act_order)
            report.layer_errors[name] = relative_output_error(weight, quantized, xtx)
            weight.copy_(quantized)
        del accumulators
        run_block(block, inputs, block_kwargs, batch_size=batch_size, out=outputs)
        inputs, outputs = outputs, inputs
    report.seconds = time.perf_counter() - started
    return report
