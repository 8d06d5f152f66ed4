"""The backward pass of a quantized linear (block fine-tuning) dequantizes the weight once, and its
gradients equal those of the dense formula."""
import torch

from aqlm import ops
from aqlm.format import dequantize_reference, pack_codes


class CountingC:
    """Proxy of aqlm._C that counts dequantize calls."""

    def __init__(self, module):
        self.module, self.dequantize_calls = module, 0

    def __getattr__(self, name):
        if name == "dequantize":
            self.dequantize_calls += 1
        return getattr(self.module, name)


def weight_parts(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    codes = pack_codes(torch.randint(0, 256, (24, 8, 2), generator=generator), 8)  # 2x8g8, 24 x 64
    codebooks = torch.randn(2, 256, 1, 8, generator=generator).requires_grad_(True)
    scales = (torch.rand(24, 1, 1, 1, generator=generator) + 0.5).requires_grad_(True)
    bias = torch.randn(24, generator=generator).requires_grad_(True)
    return codes, codebooks, scales, bias


def test_backward_dequantizes_once_and_matches_the_dense_formula(monkeypatch):
    codes, codebooks, scales, bias = weight_parts()
    x = torch.randn(3, 40, 64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    target = torch.randn(3, 40, 24, generator=torch.Generator().manual_seed(2))

    out = ops.quantized_matmul(x, codes, codebooks, scales, bias)
    counter = CountingC(ops._C)
    monkeypatch.setattr(ops, "_C", counter)
    ((out - target) ** 2).sum().backward()
    monkeypatch.undo()
    assert counter.dequantize_calls == 1, f"backward dequantized {counter.dequantize_calls} times"

    x2, codebooks2, scales2, bias2 = (t.detach().clone().requires_grad_(True) for t in (x, codebooks, scales, bias))
    dense = dequantize_reference(codes, codebooks2, scales2)
    ((torch.nn.functional.linear(x2, dense, bias2) - target) ** 2).sum().backward()
    for got, expected in ((x.grad, x2.grad), (codebooks.grad, codebooks2.grad), (scales.grad, scales2.grad), (bias.grad, bias2.grad)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_codebook_gradient_from_precomputed_rows_equals_weight_gradients_and_autograd():
    """The least-squares solve computes the codes' rows once (codeword_rows) and reuses them."""
    generator = torch.Generator().manual_seed(3)
    for num_codebooks, nbits, og, ig in ((2, 8, 1, 8), (1, 4, 2, 4), (3, 6, 1, 4)):
        codes = pack_codes(torch.randint(0, 2**nbits, (12, 10, num_codebooks), generator=generator), nbits)
        codebooks = torch.randn(num_codebooks, 2**nbits, og, ig, generator=generator)
        scales = torch.rand(12, 1, 1, 1, generator=generator)
        grad_weight = torch.randn(12 * og, 10 * ig, generator=generator)
        expected, _ = ops.weight_gradients(grad_weight, codes, codebooks, scales, True, False)
        got = ops.codebook_gradient(grad_weight, ops.codeword_rows(codes, 2**nbits), scales, codebooks.shape)
        assert torch.equal(got, expected)
        leaf = codebooks.clone().requires_grad_(True)
        (reference,) = torch.autograd.grad((dequantize_reference(codes, leaf, scales) * grad_weight).sum(), leaf)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


def test_codeword_sums_equal_codebook_gradient_with_fixed_or_given_scales():
    """CodewordSums (one sparse product per call; the least-squares solve and block fine-tuning)
    gives codebook_gradient's values, the scales fixed when built or passed per call."""
    import pytest

    generator = torch.Generator().manual_seed(4)
    for num_codebooks, nbits, og, ig in ((2, 8, 1, 8), (1, 4, 2, 4), (3, 6, 1, 4)):
        codes = pack_codes(torch.randint(0, 2**nbits, (12, 10, num_codebooks), generator=generator), nbits)
        shape = torch.Size((num_codebooks, 2**nbits, og, ig))
        scales = torch.rand(12, 1, 1, 1, generator=generator) + 0.5
        grad_weight = torch.randn(12 * og, 10 * ig, generator=generator)
        expected = ops.codebook_gradient(grad_weight, ops.codeword_rows(codes, 2**nbits), scales, shape)
        torch.testing.assert_close(ops.CodewordSums(codes, shape, scales)(grad_weight), expected, rtol=1e-5, atol=1e-5)
        sums = ops.CodewordSums(codes, shape)
        torch.testing.assert_close(sums(grad_weight, scales), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="pass scales to CodewordSums either when building it or when calling it"):
            sums(grad_weight)
