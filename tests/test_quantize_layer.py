"""`aqlm.quantize.layer.quantize_weight` on a synthetic 64 x 128 layer with correlated activations:
it improves on its initialisation, more epochs do not hurt, both codebook updates work, and the
QuantizedLinear built from the result has exactly the error it reports."""
from __future__ import annotations

import pytest
import torch

import aqlm
from aqlm.format import AqlmScheme, dequantize_reference
from aqlm.quantize.layer import LayerConfig, LayerResult, quantize_weight

SCHEMES = [AqlmScheme(2, 6, 8, 1), AqlmScheme(1, 8, 8, 1), AqlmScheme(2, 4, 4, 2)]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """A 64 x 128 layer is too small for a second thread to pay for its synchronisation."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_layer(seed: int = 0, tokens: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight [64, 128], activations X [tokens, 128] = Z (I + dense mixing), XTX = X^T X / tokens)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(64, 128, generator=generator)
    mixing = torch.eye(128) + torch.randn(128, 128, generator=generator) / 128**0.5
    activations = torch.randn(tokens, 128, generator=generator) @ mixing
    return weight, activations, activations.T @ activations / tokens


def config(scheme: AqlmScheme, **changes) -> LayerConfig:
    """A small, fast configuration: fixed epochs (no early stop), 20 optimizer steps per epoch."""
    settings = dict(
        scheme=scheme,
        max_epochs=3,
        relative_mse_tolerance=None,
        steps_per_epoch=20,
        lr=1e-3,
        init_max_iter=20,
        num_threads=1,
    )
    settings.update(changes)
    return LayerConfig(**settings)


def relative_output_error(weight: torch.Tensor, activations: torch.Tensor, quantized: torch.Tensor) -> float:
    """||X W^T - X What^T||^2 / ||X W^T||^2 in float64."""
    x = activations.double()
    reference = x @ weight.double().T
    return float((reference - x @ quantized.double().T).square().sum() / reference.square().sum())


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda scheme: scheme.name)
@pytest.mark.parametrize("codebook_update", ["lstsq", "adam"])
def test_quantize_weight_improves_on_init(scheme: AqlmScheme, codebook_update: str) -> None:
    weight, _, xtx = synthetic_layer()
    result = quantize_weight(weight, xtx, config(scheme, codebook_update=codebook_update))
    assert result.epochs == 3
    assert result.final_error < 0.9 * result.initial_error
    assert result.codes.shape == (64 // scheme.out_group_size, 128 // scheme.in_group_size, scheme.num_codebooks)
    assert result.codes.dtype == torch.int8
    assert result.codebooks.shape == (
        scheme.num_codebooks,
        scheme.codebook_size,
        scheme.out_group_size,
        scheme.in_group_size,
    )


@pytest.mark.parametrize("codebook_update", ["lstsq", "adam"])
def test_more_epochs_are_not_worse(codebook_update: str) -> None:
    weight, _, xtx = synthetic_layer(seed=1)
    errors = [
        quantize_weight(weight, xtx, config(SCHEMES[0], max_epochs=epochs, codebook_update=codebook_update)).final_error
        for epochs in (1, 2, 5)
    ]
    assert errors[1] <= errors[0] and errors[2] <= errors[1]


def test_early_stop_by_relative_tolerance() -> None:
    weight, _, xtx = synthetic_layer(seed=2)
    result = quantize_weight(weight, xtx, config(SCHEMES[1], max_epochs=50, relative_mse_tolerance=0.05))
    assert 1 <= result.epochs < 50
    assert result.final_error < result.initial_error


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda scheme: scheme.name)
def test_quantized_linear_reproduces_reported_error(scheme: AqlmScheme) -> None:
    """The error reported is tr(dW H dW^T) / tr(W H W^T) for the weight the checkpoint decodes to,
    which for H = X^T X / n is the relative output error on the calibration activations X."""
    weight, activations, xtx = synthetic_layer(seed=3)
    result: LayerResult = quantize_weight(weight, xtx, config(scheme, codebook_update="lstsq"))
    layer = aqlm.QuantizedLinear.from_parts(result.codes, result.codebooks, result.scales)
    decoded = dequantize_reference(layer.codes, layer.codebooks, layer.scales)
    assert relative_output_error(weight, activations, decoded) == pytest.approx(result.final_error, rel=1e-4)
    with torch.no_grad():
        output = layer(activations)
    torch.testing.assert_close(output, activations @ decoded.T, rtol=1e-4, atol=1e-4)


def test_seeded_runs_are_reproducible() -> None:
    weight, _, xtx = synthetic_layer(seed=4)
    first = quantize_weight(weight, xtx, config(SCHEMES[0], seed=7))
    again = quantize_weight(weight, xtx, config(SCHEMES[0], seed=7))
    assert torch.equal(first.codes, again.codes)
    assert torch.equal(first.codebooks, again.codebooks)
    assert first.final_error == again.final_error


def test_bad_inputs_raise_clear_errors() -> None:
    weight, _, xtx = synthetic_layer(seed=5)
    broken = weight.clone()
    broken[3, 7] = torch.nan
    with pytest.raises(ValueError, match="the layer weight has NaN or Inf values"):
        quantize_weight(broken, xtx, config(SCHEMES[1]))
    broken_xtx = xtx.clone()
    broken_xtx[0, 0] = torch.inf
    with pytest.raises(ValueError, match="XTX has NaN or Inf values"):
        quantize_weight(weight, broken_xtx, config(SCHEMES[1]))
    with pytest.raises(ValueError, match=r"xtx must have shape \(128, 128\), got \(64, 64\)"):
        quantize_weight(weight, xtx[:64, :64], config(SCHEMES[1]))
    with pytest.raises(ValueError, match="in_group_size 8 does not divide in_features 124"):
        quantize_weight(weight[:, :124], xtx[:124, :124], config(SCHEMES[1]))
    with pytest.raises(ValueError, match="out_group_size 2 does not divide out_features 63"):
        quantize_weight(weight[:63], xtx, config(SCHEMES[2]))
    with pytest.raises(ValueError, match="codebook_update must be 'adam' or 'lstsq'"):
        config(SCHEMES[1], codebook_update="sgd")
