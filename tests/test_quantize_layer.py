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



def _unit_weights(codes, codebooks_shape, scales) -> torch.Tensor:
    """[codebook entries, out * in] float64: row i is the dense weight of codebooks e_i (the linear map D)."""
    from aqlm.ops import dequantize

    size = int(torch.tensor(codebooks_shape).prod())
    units = torch.eye(size).view(size, *codebooks_shape)
    return torch.stack([dequantize(codes, unit, scales).double().flatten() for unit in units])


def _normal_equations(codes, codebooks_shape, scales, weight, xtx) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, b) of min over codebooks C of tr((W - D(C)) H (W - D(C))^T): A = D^T H D, b = D^T W H (float64)."""
    units = _unit_weights(codes, codebooks_shape, scales)
    out_features, in_features = weight.shape
    projected = (units.view(-1, out_features, in_features) @ xtx.double()).view(units.shape[0], -1)
    return units @ projected.T, units @ (weight.double() @ xtx.double()).flatten()


@pytest.mark.parametrize("scheme", [AqlmScheme(2, 3, 4, 1), AqlmScheme(2, 4, 2, 2)], ids=lambda scheme: scheme.name)
def test_codeword_preconditioner_inverts_the_own_group_blocks(scheme: AqlmScheme) -> None:
    """Each codeword's block is the sum over the groups it codes of scale^2 * (that group's diagonal
    block of XTX), for each of its rows: the normal matrix's diagonal block when no output group
    uses the codeword twice."""
    from aqlm.format import unpack_codes
    from aqlm.ops import codeword_rows
    from aqlm.quantize.layer import codeword_preconditioner, init_quantized_weight

    generator = torch.Generator().manual_seed(8)
    weight = torch.randn(8, 16, generator=generator)
    activations = torch.randn(64, 16, generator=generator)
    xtx = activations.T @ activations / 64
    codes, codebooks, scales = init_quantized_weight(weight, config(scheme, init_max_iter=3))
    scales = scales * (1.0 + torch.rand(scales.shape, generator=generator))
    og, ig, size = scheme.out_group_size, scheme.in_group_size, scheme.codebook_size
    inverse = codeword_preconditioner(codeword_rows(codes, size), scales, xtx, codebooks.shape)
    unpacked = unpack_codes(codes, scheme.nbits_per_codebook)
    expected = torch.zeros(scheme.num_codebooks * size, ig, ig, dtype=torch.float64)
    for o, g, m in torch.cartesian_prod(*(torch.arange(n) for n in unpacked.shape)).tolist():
        block = xtx[g * ig : (g + 1) * ig, g * ig : (g + 1) * ig].double()
        expected[m * size + int(unpacked[o, g, m])] += float(scales.view(-1)[o]) ** 2 * block
    normal, _ = _normal_equations(codes, codebooks.shape, scales, weight, xtx)
    exact = 0
    for codeword in range(scheme.num_codebooks * size):
        rows = [o for o, g in torch.nonzero(unpacked[..., codeword // size] == codeword % size).tolist()]
        if not rows:
            torch.testing.assert_close(inverse[codeword].double(), torch.eye(ig, dtype=torch.float64))
            continue
        torch.testing.assert_close(inverse[codeword].double() @ expected[codeword], torch.eye(ig, dtype=torch.float64),
                                   atol=1e-4, rtol=1e-4)
        if len(set(rows)) == len(rows):
            span = slice(codeword * og * ig, (codeword + 1) * og * ig)
            own = torch.kron(torch.eye(og, dtype=torch.float64), expected[codeword])
            torch.testing.assert_close(normal[span, span], own, atol=1e-5, rtol=1e-5)
            exact += 1
    assert exact > 0


def test_lstsq_reaches_the_exact_minimum_and_its_tolerance_ends_solves_early(monkeypatch) -> None:
    import aqlm.quantize.layer as layer_module
    from aqlm.quantize.layer import LayerObjective, _lstsq_update, init_quantized_weight

    scheme = AqlmScheme(2, 3, 8, 1)
    weight, _, xtx = synthetic_layer(seed=6)
    objective = LayerObjective(weight, xtx, scheme.out_group_size)
    codes, codebooks, scales = init_quantized_weight(objective.weight, config(scheme))
    normal, rhs = _normal_equations(codes, codebooks.shape, scales, objective.weight, xtx)
    # The normal matrix is singular (codewords no group uses): its pseudo-inverse from the symmetric
    # eigendecomposition. torch.linalg.lstsq's default driver (gelsy) gave a worse solution on its
    # first call in some processes on an AMD EPYC (relative error 0.66-0.72 against 0.4475), then
    # the right one.
    exact = (torch.linalg.pinv(normal, hermitian=True) @ rhs).view(codebooks.shape).float()
    products = []
    original = layer_module.dequantize

    def counted(*args):
        products.append(1)
        return original(*args)

    monkeypatch.setattr(layer_module, "dequantize", counted)
    errors, steps = {}, {}
    for tolerance in (None, 1e-2):
        products.clear()
        solved = codebooks.clone()
        layer_config = config(scheme, codebook_update="lstsq", steps_per_epoch=100, lstsq_tolerance=tolerance)
        _lstsq_update(objective, codes, solved, scales.clone(), layer_config)
        errors[tolerance], steps[tolerance] = objective.relative_error(codes, solved, scales), len(products)
    assert errors[None] == pytest.approx(objective.relative_error(codes, exact, scales), rel=1e-4)
    assert 3 < steps[1e-2] < steps[None] <= 100
    assert errors[None] < errors[1e-2] <= errors[None] * 1.02
    with pytest.raises(ValueError, match=r"lstsq_tolerance must be in \[0, 1\) or None, got 1.5"):
        config(scheme, lstsq_tolerance=1.5)
