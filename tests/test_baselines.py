from __future__ import annotations

import copy

import pytest
import torch

from aqlm.baselines import (
    gptq_quantize_weight,
    quantize_model_gptq,
    quantize_model_rtn,
    relative_output_error,
    rtn_bits_per_weight,
    rtn_quantize_weight,
)
from aqlm.calibration import find_linears
from aqlm.evaluate import kl_divergence, sample_sequences
from random_models import tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


def correlated_problem(rows=48, columns=96, tokens=2048, seed=0):
    """A weight and X^T X of strongly correlated inputs X = Z @ A (and a few outlier features)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, columns, generator=generator)
    mixing = torch.randn(columns, columns, generator=generator)
    inputs = torch.randn(tokens, columns, generator=generator) @ mixing
    inputs[:, :4] *= 5
    return weight, inputs.T @ inputs / tokens


def output_error(weight, quantized, xtx):
    delta = (quantized - weight).double()
    return torch.trace(delta @ xtx.double() @ delta.T).item()


def test_rtn_error_shrinks_with_bits():
    weight = torch.randn(32, 100, generator=torch.Generator().manual_seed(0))
    errors = [(rtn_quantize_weight(weight, bits, 16) - weight).square().sum().item() for bits in range(1, 9)]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-4 * weight.square().sum().item()


@pytest.mark.parametrize("bits, group_size", [(2, 8), (3, 12), (4, 7)])
def test_rtn_is_exact_on_its_grid(bits, group_size):
    """Weights of the form scale * (q - zero), with q reaching 0 and maxq in every group, are kept."""
    maxq = 2**bits - 1
    generator = torch.Generator().manual_seed(bits)
    rows, columns = 6, 40
    groups = -(-columns // group_size)
    levels = torch.randint(0, maxq + 1, (rows, columns), generator=generator)
    for start in range(0, columns, group_size):
        levels[:, start], levels[:, start + 1] = 0, maxq
    scale = 2.0 ** torch.randint(-6, 0, (rows, groups), generator=generator).float()
    zero = torch.randint(0, maxq + 1, (rows, groups), generator=generator).float()
    expand = lambda t: t.repeat_interleave(group_size, dim=1)[:, :columns]
    weight = expand(scale) * (levels - expand(zero))
    assert torch.equal(rtn_quantize_weight(weight, bits, group_size), weight)


def test_rtn_keeps_dtype_and_handles_zero_groups():
    weight = torch.zeros(4, 16, dtype=torch.bfloat16)
    weight[0, :8] = 1.5
    quantized = rtn_quantize_weight(weight, 3, 8)
    assert quantized.dtype == torch.bfloat16
    assert torch.equal(quantized, weight)


def test_rtn_bits_per_weight():
    assert rtn_bits_per_weight(4, 128) == 4.25
    assert rtn_bits_per_weight(3, 64, param_bits=32) == 4.0


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(bits):
    weight, xtx = correlated_problem()
    rtn = output_error(weight, rtn_quantize_weight(weight, bits, 32), xtx)
    gptq = output_error(weight, gptq_quantize_weight(weight, xtx, bits, 32), xtx)
    assert gptq < 0.7 * rtn
    with_order = gptq_quantize_weight(weight, xtx, bits, 32, act_order=True)
    assert output_error(weight, with_order, xtx) < 0.7 * rtn


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_result_lies_on_a_grid(act_order):
    """Every group of the result has at most 2**bits distinct values."""
    weight, xtx = correlated_problem()
    quantized = gptq_quantize_weight(weight, xtx, 2, 32, act_order=act_order)
    if act_order:
        quantized = quantized[:, torch.argsort(torch.diag(xtx), descending=True)]
    for start in range(0, 96, 32):
        for row in quantized[:, start : start + 32]:
            assert row.unique().numel() <= 4


@pytest.mark.parametrize("group_size", [8, 16, 96])
def test_gptq_with_diagonal_xtx_equals_rtn(group_size):
    """No off-diagonal H^-1 terms: no error is spread and group parameters come from the original weights."""
    weight, _ = correlated_problem()
    rtn = rtn_quantize_weight(weight, 3, group_size)
    assert torch.equal(gptq_quantize_weight(weight, torch.eye(96), 3, group_size), rtn)
    diagonal = torch.diag(torch.rand(96, generator=torch.Generator().manual_seed(1)) + 0.1)
    assert torch.equal(gptq_quantize_weight(weight, diagonal, 3, group_size, block_size=10), rtn)
    # act_order permutes columns; with one group per row the permutation cannot matter
    assert torch.equal(
        gptq_quantize_weight(weight, diagonal, 3, 96, act_order=True), rtn_quantize_weight(weight, 3, 96)
    )


@pytest.mark.parametrize("group_size", [8, 24, 40, 96])
def test_gptq_block_size_does_not_change_the_result(group_size):
    """Lazy batch updates only reorder the arithmetic, also for groups that straddle blocks.

    Group parameters are computed from the fully updated weights, so any block size gives the
    same weights up to float rounding (no rounding decision flips on this problem).
    """
    weight, xtx = correlated_problem(seed=2)
    reference = gptq_quantize_weight(weight, xtx, 3, group_size, block_size=1)
    for block_size in (7, 32, 128):
        other = gptq_quantize_weight(weight, xtx, 3, group_size, block_size=block_size)
        torch.testing.assert_close(other, reference, rtol=0, atol=1e-5)


def test_gptq_dead_inputs_are_zeroed():
    weight, xtx = correlated_problem()
    xtx[5, :] = 0
    xtx[:, 5] = 0
    quantized = gptq_quantize_weight(weight, xtx, 4, 32)
    assert torch.isfinite(quantized).all()
    assert torch.equal(quantized[:, 5], torch.zeros(48))


def test_relative_output_error():
    weight, xtx = correlated_problem()
    assert relative_output_error(weight, weight, xtx) == 0.0
    assert relative_output_error(weight, torch.zeros_like(weight), xtx) == pytest.approx(1.0)


def test_argument_errors():
    weight, xtx = correlated_problem()
    with pytest.raises(ValueError, match="bits"):
        rtn_quantize_weight(weight, 0, 8)
    with pytest.raises(ValueError, match="group_size"):
        rtn_quantize_weight(weight, 4, 0)
    with pytest.raises(ValueError, match=r"\[96, 96\].*\(95, 95\)"):
        gptq_quantize_weight(weight, xtx[:95, :95], 4, 8)
    with pytest.raises(ValueError, match="weight"):
        gptq_quantize_weight(weight[0], xtx, 4, 8)


def test_quantize_model_rtn_keeps_head_and_embeddings(llama):
    original = copy.deepcopy(llama)
    report = quantize_model_rtn(llama, 3, 16, progress=False)
    assert report.method == "rtn" and report.bits_per_weight == 5.0
    assert len(report.layer_errors) == 14 and all(0 < e < 1 for e in report.layer_errors.values())
    assert torch.equal(llama.lm_head.weight, original.lm_head.weight)
    assert torch.equal(llama.model.embed_tokens.weight, original.model.embed_tokens.weight)
    q_proj = llama.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(q_proj, rtn_quantize_weight(original.model.layers[1].self_attn.q_proj.weight, 3, 16))


def test_quantize_model_gptq_end_to_end_beats_rtn():
    reference = tiny_llama(seed=3, layers=3)
    calibration = sample_sequences(reference, 16, 64, seed=0, progress=False)
    evaluation = sample_sequences(reference, 8, 64, seed=1, progress=False)
    rtn, gptq = copy.deepcopy(reference), copy.deepcopy(reference)
    quantize_model_rtn(rtn, 3, 16, progress=False)
    report = quantize_model_gptq(gptq, calibration, 3, 16, batch_size=4, progress=False)
    assert report.method == "gptq" and report.seconds > 0
    assert set(report.layer_errors) == {f"model.{name}" for name in find_linears(gptq.model) if "layers" in name}
    assert all(0 < error < 1 for error in report.layer_errors.values())
    assert torch.equal(gptq.lm_head.weight, reference.lm_head.weight)
    kl_rtn = kl_divergence(rtn, reference, evaluation, batch_size=4, progress=False)
    kl_gptq = kl_divergence(gptq, reference, evaluation, batch_size=4, progress=False)
    assert 0 < kl_gptq < kl_rtn


def test_quantize_model_gptq_batch_size_and_skip():
    """Batching changes only float rounding (which may flip a few roundings), not the quality; skip is honoured."""
    reference = tiny_llama(seed=4)
    windows = torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(0))
    first, second = copy.deepcopy(reference), copy.deepcopy(reference)
    one = quantize_model_gptq(first, windows, 4, 32, batch_size=1, progress=False)
    three = quantize_model_gptq(second, windows, 4, 32, batch_size=3, skip=("lm_head", "down_proj"), progress=False)
    assert torch.equal(second.model.layers[0].mlp.down_proj.weight, reference.model.layers[0].mlp.down_proj.weight)
    skipped = {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert set(one.layer_errors) - set(three.layer_errors) == skipped
    for name, error in three.layer_errors.items():
        assert error == pytest.approx(one.layer_errors[name], rel=0.05), name
