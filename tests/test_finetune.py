"""Block fine-tuning trains QuantizedLinear parameters through dense products (one dequantization
per step): the gradients are those of the layer's own autograd formula, and the block keeps its
modules and state-dict names."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import aqlm
from aqlm import kernel_choice
from aqlm.format import AqlmScheme
from aqlm.quantize.finetune import FinetuneConfig, _dense_training, _TrainingLinear, finetune_block
from aqlm.quantize.layer import LayerConfig, init_quantized_weight


def _layer(scheme: AqlmScheme, seed: int, bias: bool) -> aqlm.QuantizedLinear:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 32, generator=generator)
    codes, codebooks, scales = init_quantized_weight(weight, LayerConfig(scheme=scheme, init_max_iter=3, num_threads=1))
    scales = scales * (1.0 + torch.rand(scales.shape, generator=generator))
    return aqlm.QuantizedLinear.from_parts(codes, codebooks, scales, torch.randn(16, generator=generator) if bias else None)


def _gradients(module: nn.Module, layer: aqlm.QuantizedLinear, x: torch.Tensor) -> list[torch.Tensor]:
    parameters = [p for p in (layer.codebooks, layer.scales, layer.bias) if p is not None]
    for p in parameters:
        p.requires_grad_(True)
        p.grad = None
    x = x.clone().requires_grad_(True)
    loss = (module(x) * torch.linspace(-1, 1, 16)).square().sum()
    loss.backward()
    grads = [x.grad] + [p.grad.clone() for p in parameters]
    for p in parameters:
        p.requires_grad_(False)
        p.grad = None
    return grads


def test_training_linear_gives_the_quantized_layers_output_and_gradients(monkeypatch) -> None:
    monkeypatch.setenv(kernel_choice.FORCE_ENV, "dequantize")  # the layer's exact kernel (few tokens: lutq)
    for scheme, bias in ((AqlmScheme(2, 4, 8, 1), True), (AqlmScheme(1, 5, 4, 2), False)):
        layer = _layer(scheme, seed=1, bias=bias)
        x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            reference = x @ layer.reference_weight().T + (0 if layer.bias is None else layer.bias)
            torch.testing.assert_close(_TrainingLinear(layer)(x), reference, rtol=1e-5, atol=1e-5)
        expected = _gradients(layer, layer, x)
        actual = _gradients(_TrainingLinear(layer), layer, x)
        for want, got in zip(expected, actual):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_dense_training_shares_parameters_and_restores_the_block() -> None:
    block = nn.Sequential(_layer(AqlmScheme(2, 4, 8, 1), seed=3, bias=True), nn.ReLU(), nn.Linear(16, 4))
    block[2] = aqlm.QuantizedLinear.from_parts(*init_quantized_weight(
        torch.randn(32, 16), LayerConfig(scheme=AqlmScheme(1, 4, 8, 1), init_max_iter=2, num_threads=1)))
    originals = [block[0], block[2]]
    names = list(block.state_dict())
    with _dense_training(block):
        assert isinstance(block[0], _TrainingLinear) and isinstance(block[2], _TrainingLinear)
        assert list(block.state_dict()) == names
        assert block[0].codebooks is originals[0].codebooks and block[2].scales is originals[1].scales
    assert block[0] is originals[0] and block[2] is originals[1]


def test_finetune_block_lowers_the_loss_with_the_dense_path() -> None:
    generator = torch.Generator().manual_seed(4)
    layer = _layer(AqlmScheme(2, 4, 8, 1), seed=4, bias=True)
    target = nn.Linear(32, 16)
    inputs = torch.randn(8, 6, 32, generator=generator)
    with torch.no_grad():
        targets = target(inputs)
    block = nn.Sequential(layer)
    before = float(((layer(inputs) - targets) ** 2).mean().detach())
    stats = finetune_block(block, inputs, targets, {}, FinetuneConfig(max_epochs=3, lr=1e-2), seed=0, progress=False)
    assert block[0] is layer and not layer.codebooks.requires_grad
    after = float(((layer(inputs) - targets) ** 2).mean().detach())
    assert after < before and len(stats["train_loss"]) == 3


def test_bfloat16_finetuning_multiplies_in_bfloat16_and_keeps_float32_parameters() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class ProductDtypes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.dtypes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            dense = all(not isinstance(a, torch.Tensor) or a.layout == torch.strided for a in args)
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and dense:  # not the codeword sums
                self.dtypes.append(out.dtype)
            return out

    generator = torch.Generator().manual_seed(5)
    inputs = torch.randn(4, 6, 32, generator=generator)
    targets = torch.randn(4, 6, 16, generator=generator)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        layer = _layer(AqlmScheme(2, 4, 8, 1), seed=5, bias=True)
        with ProductDtypes() as products:
            stats = finetune_block(nn.Sequential(layer), inputs, targets, {}, FinetuneConfig(max_epochs=1, lr=1e-3, dtype=dtype),
                                   seed=0, progress=False)
        assert set(products.dtypes) == {getattr(torch, dtype)}, dtype
        assert layer.codebooks.dtype == layer.scales.dtype == torch.float32
        losses[dtype] = stats["train_loss"][0]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
    with pytest.raises(ValueError, match="finetune dtype must be 'float32' or 'bfloat16', got 'float16'"):
        FinetuneConfig(dtype="float16")
