"""Block fine-tuning: after all linears of a transformer block are quantized, train the block's
codebooks, scales, biases and remaining float parameters (norms) to reproduce the dense block's
outputs on the calibration set (as upstream AQLM does)."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..inference import QuantizedLinear
from ..ops import CodewordSums, scale_rows, unscaled_weight


@dataclass
class FinetuneConfig:
    """Block fine-tuning hyperparameters (defaults as upstream AQLM).

    Attributes:
        max_epochs: passes over the calibration windows; 0 disables fine-tuning.
        early_stop: stop after this many epochs without a better validation loss.
        lr, beta1, beta2: Adam.
        batch_size: windows per optimizer step.
        dtype: "float32", or "bfloat16" to run the training steps' matrix products in bfloat16
            (autocast; parameters, optimizer and validation losses stay float32). Much faster on
            CPUs with AMX or AVX-512 BF16, slower on CPUs without bfloat16 instructions.
    """

    max_epochs: int = 5
    early_stop: int = 3
    lr: float = 1e-5
    beta1: float = 0.9
    beta2: float = 0.95
    batch_size: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.max_epochs < 0 or self.early_stop < 1 or self.batch_size < 1:
            raise ValueError("finetune max_epochs must be >= 0, early_stop and batch_size >= 1")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"finetune dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        if not self.lr > 0:
            raise ValueError(f"finetune lr must be positive, got {self.lr}")


def trainable_parameters(block: nn.Module) -> list[nn.Parameter]:
    """Every float parameter of the block: codebooks, scales, biases and norm weights (codes are integers)."""
    return [p for p in block.parameters() if p.is_floating_point()]


class _DenseWeight(torch.autograd.Function):
    """The dense float32 weight of codes, codebooks and scales, differentiable in codebooks and
    scales: one dequantization forward (kept for the scales' gradient), none backward."""

    @staticmethod
    def forward(ctx, codebooks: torch.Tensor, scales: torch.Tensor, codes: torch.Tensor, sums: CodewordSums):
        unscaled = unscaled_weight(codes, codebooks)
        ctx.save_for_backward(scales, unscaled)
        ctx.sums, ctx.codebooks_dtype = sums, codebooks.dtype
        return scale_rows(unscaled, scales)

    @staticmethod
    def backward(ctx, grad_weight: torch.Tensor):
        scales, unscaled = ctx.saved_tensors
        grad_codebooks = grad_scales = None
        if ctx.needs_input_grad[0]:
            grad_codebooks = ctx.sums(grad_weight, scales).to(ctx.codebooks_dtype)
        if ctx.needs_input_grad[1]:
            groups = scales.numel()
            products = grad_weight.float().reshape(groups, -1) * unscaled.reshape(groups, -1)
            grad_scales = products.sum(dim=1).view_as(scales).to(scales.dtype)
        return grad_codebooks, grad_scales, None, None


class _TrainingLinear(nn.Module):
    """A :class:`QuantizedLinear` for fine-tuning: the same parameter objects under the same names,
    and a forward that dequantizes the weight once (with autograd to codebooks and scales) and
    multiplies densely, so backward needs no further dequantization."""

    def __init__(self, layer: QuantizedLinear):
        super().__init__()
        self.codebooks, self.codes, self.scales, self.bias = layer.codebooks, layer.codes, layer.scales, layer.bias
        self.sums = CodewordSums(layer.codes, layer.codebooks.shape)  # codes never change here
        self.layer = [layer]  # the original, put back by _dense_training (a list: not a submodule)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight = _DenseWeight.apply(self.codebooks, self.scales, self.codes, self.sums)
        return F.linear(input, weight.to(input.dtype), self.bias)


@contextmanager
def _dense_training(block: nn.Module) -> Iterator[None]:
    """Swap every CPU :class:`QuantizedLinear` of ``block`` for a :class:`_TrainingLinear` sharing
    its parameters, and put the originals back on exit."""
    names = [name for name, module in block.named_modules() if isinstance(module, QuantizedLinear) and module.codes.is_cpu]
    for name in names:
        block.set_submodule(name, _TrainingLinear(block.get_submodule(name)))
    try:
        yield
    finally:
        for name in names:
            block.set_submodule(name, block.get_submodule(name).layer[0])


def _block_loss(block: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, block_kwargs: dict) -> torch.Tensor:
    outputs = block(inputs, **block_kwargs)
    if isinstance(outputs, (tuple, list)):
        outputs = outputs[0]
    return F.mse_loss(outputs.float(), targets.float())


def _mean_loss(block, inputs, targets, block_kwargs, batch_size) -> float:
    total = 0.0
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            stop = start + batch_size
            total += float(_block_loss(block, inputs[start:stop], targets[start:stop], block_kwargs)) * (
                min(stop, inputs.shape[0]) - start
            )
    return total / inputs.shape[0]


def finetune_block(
    block: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    block_kwargs: dict[str, Any],
    config: FinetuneConfig,
    seed: int,
    val_inputs: Optional[torch.Tensor] = None,
    val_targets: Optional[torch.Tensor] = None,
    progress: bool = True,
) -> dict:
    """Fine-tune ``block`` in place to map ``inputs`` to the dense block's ``targets`` (MSE).

    With validation windows, the parameters with the best validation loss are kept and training
    stops after ``config.early_stop`` epochs without improvement. Returns the losses.
    """
    if not any(isinstance(m, QuantizedLinear) for m in block.modules()):
        raise ValueError("finetune_block expects a block whose linears are QuantizedLinear")
    parameters = trainable_parameters(block)
    stats = {"train_loss": [], "val_loss": []}
    if config.max_epochs == 0 or not parameters:
        return stats
    has_val = val_inputs is not None and val_inputs.shape[0] > 0
    previous = [p.requires_grad for p in parameters]
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=config.lr, betas=(config.beta1, config.beta2))
    generator = torch.Generator().manual_seed(seed)
    best_state, best_loss, worse = None, float("inf"), 0
    if has_val:
        best_loss = _mean_loss(block, val_inputs, val_targets, block_kwargs, config.batch_size)
        best_state = copy.deepcopy(block.state_dict())
        stats["val_loss"].append(best_loss)
    try:
        with _dense_training(block):  # the same parameters, trained through dense products
            for epoch in tqdm(range(config.max_epochs), desc="fine-tune", leave=False, disable=not progress):
                order = torch.randperm(inputs.shape[0], generator=generator)
                total = 0.0
                for start in range(0, len(order), config.batch_size):
                    batch = order[start : start + config.batch_size]
                    with torch.autocast(inputs.device.type, dtype=torch.bfloat16, enabled=config.dtype == "bfloat16"):
                        loss = _block_loss(block, inputs[batch], targets[batch], block_kwargs)
                    if not torch.isfinite(loss):
                        raise ValueError(f"fine-tuning loss is {float(loss)} at epoch {epoch}")
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    total += float(loss.detach()) * len(batch)
                stats["train_loss"].append(total / inputs.shape[0])
                if not has_val:
                    continue
                val_loss = _mean_loss(block, val_inputs, val_targets, block_kwargs, config.batch_size)
                stats["val_loss"].append(val_loss)
                if val_loss < best_loss:
                    best_loss, worse = val_loss, 0
                    best_state = copy.deepcopy(block.state_dict())
                else:
                    worse += 1
                    if worse >= config.early_stop:
                        break
        if best_state is not None:
            block.load_state_dict(best_state)
    finally:
        for p, flag in zip(parameters, previous):
            p.requires_grad_(flag)
            p.grad = None
    return stats
