"""Exact wide-token lookup tables (``_C.lutw_matmul``): fp32 tables holding 16 (or 8) tokens side
by side, looked up through lutq's packed codes.

Every output sums each codebook's table entries over the input groups in order, then the
codebooks in order (codebooks of 16 codewords in nibble packing as pairs of summed codewords), whatever the SIMD level and the thread count (which split the codebooks and
the rows: csrc/lutw.h), so all of them must give the scalar reference's bits; and the result must
match the float64 defining formula to float rounding.
"""
import numpy as np
import pytest
import torch

from aqlm import _C, QuantizedLinear, pack_codes
from aqlm import ops
from parallel import always_parallel  # noqa: F401 (fixture)
from simd_levels import simd_params, supported_levels
from test_lutq import DTYPES, call_matmul, formula, random_weight

# (out, in, num_codebooks, nbits, in_group_size): 2x8g8, nibble-packed 4x4g8 and 2x2g4, one codebook,
# an odd number of 16-codeword codebooks (one code per byte), groups of 4 and 6, rows not a
# multiple of 64 (padding rows in the last tile), fewer rows than one tile, several blocks of
# groups (lutw.h: 128 KiB of 16-token tables, 4 groups at 2x8g8, 32 at 4x4g8; 40 and 200 groups).
CONFIGS = [
    (200, 96, 2, 8, 8),
    (130, 256, 4, 4, 8),
    (64, 64, 1, 8, 8),
    (100, 80, 3, 4, 8),
    (70, 48, 2, 8, 4),
    (40, 60, 2, 5, 6),
    (17, 200, 2, 4, 8),
    (257, 32, 6, 4, 8),
    (96, 320, 2, 8, 8),
    (70, 1600, 4, 4, 8),
    (64, 48, 2, 2, 4),  # nibbles of 4 codewords: masked
    (20, 24, 1, 1, 3),  # 2 codewords, groups of 3
]
TOKENS = [1, 2, 7, 8, 9, 16, 17, 33]


def run_lutw(x, codes, codebooks, scales, bias, simd, num_threads=2):
    packed = ops.packed_codes(codes, codebooks, scales)
    return call_matmul(_C.lutw_matmul, x, packed, codes.shape[0], codebooks, scales, bias, simd, num_threads)


def rounding_bound(x, codes, codebooks, scales, bias):
    """fp32 rounding of the tables and of the sums: relative 1e-5 of the sum of |terms|."""
    nbits = codebooks.shape[1].bit_length() - 1
    ig = codebooks.shape[3]
    dense = torch.stack([cb for cb in codebooks.double()[:, :, 0, :]])  # [M, K, ig]
    unpacked = ops.unpack_codes(codes, nbits).long()  # [out, G, M]
    words = dense[torch.arange(dense.shape[0])[None, None, :], unpacked]  # [out, G, M, ig]
    xs = x.double().view(x.shape[0], -1, ig)  # [n, G, ig]
    terms = torch.einsum("tji,ojmi->to", xs.abs(), words.abs())
    bias_part = 0 if bias is None else bias.double().abs()
    return 1e-5 * (terms * scales.double().abs().view(1, -1) + bias_part) + 1e-6


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_every_level_and_thread_count_gives_the_scalar_bits(config, tokens, with_bias, always_parallel):
    codes, codebooks, scales, bias = random_weight(*config, seed=tokens)
    bias = bias if with_bias else None
    x = torch.randn(tokens, config[1], generator=torch.Generator().manual_seed(tokens))
    reference = run_lutw(x, codes, codebooks, scales, bias, "scalar", num_threads=1)
    for level in supported_levels():
        run_lutw(torch.randn_like(x), codes, codebooks, scales, bias, level, num_threads=2)  # decoy: other sums in the buffers
        for threads in (1, 2, 3):
            got = run_lutw(x, codes, codebooks, scales, bias, level, num_threads=threads)
            assert torch.equal(got, reference), f"simd={level} threads={threads}"
    error = (reference.double() - formula(x, codes, codebooks, scales, bias)).abs()
    bound = rounding_bound(x, codes, codebooks, scales, bias)
    assert (error <= bound).all(), f"error {float((error - bound).max())} above float rounding"


def test_each_token_gets_the_bits_it_gets_alone():
    """Tokens share the tables of their pass (16 side by side, or 8 in a last pass of <= 8): a
    token's outputs must not depend on its neighbours, its place in the pass or the pass width."""
    codes, codebooks, scales, bias = random_weight(130, 96, 2, 8, 8, seed=7)
    x = torch.randn(33, 96, generator=torch.Generator().manual_seed(7))
    together = run_lutw(x, codes, codebooks, scales, bias, supported_levels()[-1])
    for t in (0, 15, 16, 31, 32):
        alone = run_lutw(x[t : t + 1], codes, codebooks, scales, bias, "scalar", num_threads=1)
        assert torch.equal(together[t : t + 1], alone), f"token {t}"


@pytest.mark.parametrize("level", simd_params())
@pytest.mark.parametrize("x_dtype", list(DTYPES))
@pytest.mark.parametrize("param_dtype", list(DTYPES))
def test_dtypes_match_the_float32_computation(level, x_dtype, param_dtype):
    codes, codebooks, scales, bias = random_weight(130, 96, 2, 8, 8, dtype=DTYPES[param_dtype])
    x = torch.randn(9, 96).to(DTYPES[x_dtype])
    got = run_lutw(x, codes, codebooks, scales, bias, level)
    expected = run_lutw(x.float(), codes, codebooks.float(), scales.float(), bias.float(), "scalar")
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=0, atol=0)


def test_the_op_and_the_eager_path_give_the_kernel_bits(monkeypatch):
    codes, codebooks, scales, bias = random_weight(200, 96, 2, 8, 8, seed=3)
    x = torch.randn(16, 96, generator=torch.Generator().manual_seed(3))
    expected = run_lutw(x, codes, codebooks, scales, bias, None, num_threads=torch.get_num_threads())
    assert torch.equal(ops.quantized_matmul_cpu(x, codes, codebooks, scales, bias, kernel="lutw"), expected)
    monkeypatch.setenv("AQLM_CPU_KERNEL", "lutw")
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
        assert torch.equal(layer(x), expected)  # the plan's bound call


def test_lutw_is_a_candidate_where_it_applies():
    assert "lutw" in ops.applicable_cpu_kernels(16, 8, 1, torch.float32, exact=True)
    assert "lutw" in ops.applicable_cpu_kernels(2, 4, 1, torch.float32, exact=False)
    assert "lutw" not in ops.applicable_cpu_kernels(1, 8, 1, torch.float32, exact=False)
    assert "lutw" not in ops.applicable_cpu_kernels(ops.FEW_TOKENS + 1, 8, 1, torch.float32, exact=False)
    assert "lutw" not in ops.applicable_cpu_kernels(16, 8, 2, torch.float32, exact=False)  # out_group_size 2
    assert "lutw" not in ops.applicable_cpu_kernels(16, 16, 1, torch.float32, exact=False)  # 65536 codewords
    assert _C.lutw_kernel(simd="scalar") == "scalar"
    assert _C.lutw_kernel(simd=_C.simd_supported()) == _C.simd_supported()


def test_lutw_rejects_what_it_cannot_serve():
    codes, codebooks, scales, bias = random_weight(64, 64, 2, 8, 8)
    x = torch.randn(2, 64)
    packed = ops.packed_codes(codes, codebooks, scales).numpy()
    out = np.zeros((2, 64), np.float32)
    args = (codebooks.numpy(), scales.numpy(), None)
    with pytest.raises(ValueError, match=r"packed must have shape \(1024,\)"):
        _C.lutw_matmul(x.numpy(), packed[:-1], *args, out)
    with pytest.raises(TypeError, match="packed must be a numpy.ndarray of dtype uint8"):
        _C.lutw_matmul(x.numpy(), packed.view(np.int8), *args, out)
    with pytest.raises(ValueError, match=r"out must"):
        _C.lutw_matmul(x.numpy(), packed, *args, np.zeros((2, 63), np.float32))
    with pytest.raises(ValueError, match="x has|features|in_group_size"):
        _C.lutw_matmul(np.zeros((2, 60), np.float32), packed, *args, out)
    with pytest.raises(ValueError, match="num_threads"):
        _C.lutw_matmul(x.numpy(), packed, *args, out, num_threads=0)
    with pytest.raises(ValueError, match="unknown SIMD level"):
        _C.lutw_matmul(x.numpy(), packed, *args, out, simd="sse9")
    with pytest.raises(ValueError, match="bias must have out_features=64"):
        _C.lutw_matmul(x.numpy(), packed, codebooks.numpy(), scales.numpy(), np.zeros(3, np.float32), out)
    with pytest.raises(TypeError):
        _C.lutw_matmul(x.numpy(), packed, *args, out, group=64)  # lutq's parameter, not lutw's
    wide = pack_codes(torch.randint(0, 2**10, (64, 8, 1)), 10)
    with pytest.raises(ValueError, match="kernel='lutw' needs codebooks of at most 256 codewords"):
        ops.quantized_matmul_cpu(x, wide, torch.randn(1, 2**10, 1, 8), torch.ones(64, 1, 1, 1), None, kernel="lutw")
    grouped = pack_codes(torch.randint(0, 256, (32, 8, 1)), 8)
    with pytest.raises(ValueError, match="kernel='lutw' needs out_group_size=1, got 2"):
        ops.quantized_matmul_cpu(x, grouped, torch.randn(1, 256, 2, 8), torch.ones(32, 1, 1, 1), None, kernel="lutw")
