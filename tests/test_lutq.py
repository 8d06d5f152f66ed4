"""Quantized lookup tables (``_C.lutq_matmul``, the default few-token CPU path: AQLM_QUANTIZED_LUT=0 turns it off).

Every SIMD level must give the scalar reference's bits (same integers, same fp32 operations in
the same order), for any thread count; and the result must stay within the error bound derived
in csrc/lutq.h from the table scales, measured against the float64 defining formula.
"""
import numpy as np
import pytest
import torch

from aqlm import QuantizedLinear, _C, dequantize_reference, pack_codes
from aqlm import ops
from parallel import always_parallel  # noqa: F401 (fixture)
from simd_levels import simd_params, supported_levels

LEVELS = 127 * 256 + 127  # csrc/lutq.h: |E| <= LEVELS, E = 256 * hi + lo
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (out, in, num_codebooks, nbits, in_group_size): rows not a multiple of 64 or of 4 tiles, chunk
# remainders, every table width class (<= 16, <= 64, <= 128, 256), one codebook and many.
CONFIGS = [
    (64, 64, 1, 8, 8),
    (200, 96, 2, 8, 8),
    (300, 136, 2, 8, 8),
    (130, 64, 4, 4, 8),
    (100, 80, 3, 6, 8),
    (70, 64, 1, 7, 16),
    (64, 48, 2, 2, 4),
    (40, 60, 8, 8, 4),
    (257, 32, 6, 4, 8),
    (20, 24, 1, 1, 3),
    # threads split the input groups (split-K, csrc/lutq.h): 72 groups split inside a chunk of 64,
    # fewer rows than one tile, nibble-packed codes split at odd groups
    (48, 576, 2, 8, 8),
    (192, 576, 2, 8, 8),
    (17, 200, 2, 4, 8),
    (5, 56, 6, 4, 8),
]


def random_weight(out, inp, M, nbits, ig, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    K = 2**nbits
    codes = pack_codes(torch.randint(0, K, (out, inp // ig, M), generator=generator), nbits)
    codebooks = torch.randn(M, K, 1, ig, generator=generator).to(dtype)
    scales = (torch.rand(out, 1, 1, 1, generator=generator) + 0.5).to(dtype)
    bias = torch.randn(out, generator=generator).to(dtype)
    return codes, codebooks, scales, bias


def np_view(t):
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def call_matmul(function, x, codes, out_features, codebooks, scales, bias, simd, num_threads, **options):
    """``function`` (one of the ``_C.*_matmul`` kernels, ``codes`` as it takes them: packed or
    not) on torch tensors; returns ``out`` [n, out_features] in x's dtype."""
    out = torch.empty(x.shape[0], out_features, dtype=x.dtype)
    names = {v: k for k, v in DTYPES.items()}
    function(
        np_view(x), codes.numpy(), np_view(codebooks), np_view(scales), None if bias is None else np_view(bias),
        np_view(out), x_dtype=names[x.dtype], param_dtype=names[codebooks.dtype], simd=simd, num_threads=num_threads,
        **options,
    )
    return out


def run_lutq(x, codes, codebooks, scales, bias, group, simd, num_threads=2):
    packed = ops.packed_codes(codes, codebooks, scales)
    return call_matmul(_C.lutq_matmul, x, packed, codes.shape[0], codebooks, scales, bias, simd, num_threads, group=group)


def table_bounds(x, codebooks):
    """lutq.h's bound on each group's table entries, B[t, j, m] = min(sum_i |x_i| cmax[m, i],
    ||x_group|| nmax[m]), in float64 [n, G, M]."""
    M, K, _, ig = codebooks.shape
    cb = codebooks.double()[:, :, 0, :]  # [M, K, ig]
    xs = x.double().view(x.shape[0], -1, ig)
    by_columns = torch.einsum("tji,mi->tjm", xs.abs(), cb.abs().amax(1))
    by_norms = xs.norm(dim=2)[:, :, None] * cb.norm(dim=2).amax(1)[None, None, :]
    return torch.minimum(by_columns, by_norms)


def entry_shift(ig):
    """lutq.h's R: the largest of 13, 12, ... with 2 * pairs * 32767 * (2**R - 1) + 2**(R-1) < 2**31."""
    shift, pairs = 13, (ig + 1) // 2
    while 2 * pairs * 32767 * (2**shift - 1) + 2 ** (shift - 1) >= 2**31:
        shift -= 1
    return shift


def error_bound(x, codes, codebooks, scales, bias, group):
    """lutq.h: each entry is off by at most s * (1/2 + ig * (1/2 + float slack) * Q / 2**R) from
    rounding E and each xq, plus sum_i |x_i| column_max[m, i] * (1/2 + slack) / Q from the rounded
    codebooks, s = the chunk's largest table_bounds / LEVELS; |y - exact| <= |scale| times the sum
    of those over the groups and codebooks, plus float rounding (relative 1e-5 of the sum of
    |entries| the output adds up). Checks on the way that the bounds do bound every table entry."""
    nbits = codebooks.shape[1].bit_length() - 1
    M, K, _, ig = codebooks.shape
    G = codes.shape[1]
    xs = x.double().view(x.shape[0], G, ig)
    tables = torch.einsum("tji,mki->tjmk", xs, codebooks.double()[:, :, 0, :])  # [n, G, M, K]
    bounds = table_bounds(x, codebooks)
    assert (tables.abs().amax(3) <= bounds * (1 + 1e-12)).all()
    chunks = (G + group - 1) // group
    step = torch.zeros(x.shape[0], G, M, dtype=torch.float64)  # s of each group's chunk
    for b in range(chunks):
        j0, j1 = b * group, min((b + 1) * group, G)
        step[:, j0:j1] = bounds[:, j0:j1].amax(dim=1)[:, None, :] / LEVELS
    unpacked = ops.unpack_codes(codes, nbits).long()  # [out, G, M]
    picked = tables[:, torch.arange(G)[None, :, None], torch.arange(M)[None, None, :], unpacked]  # [n, out, G, M]
    scale = scales.double().abs().view(1, -1)
    shift = entry_shift(ig)
    levels = 2**shift - 1
    by_columns = torch.einsum("tji,mi->tjm", xs.abs(), codebooks.double()[:, :, 0, :].abs().amax(1))
    entry_errors = step * (0.5 + ig * 0.506 * levels / 2**shift) + by_columns * (0.501 / levels + 1e-6)
    half_steps = entry_errors.sum(dim=(1, 2)).view(-1, 1)
    rounding = 1e-5 * (picked.abs().sum(dim=(2, 3)) * scale + (0 if bias is None else bias.double().abs()))
    return scale * half_steps + rounding + 1e-6


def formula(x, codes, codebooks, scales, bias):
    y = x.double() @ dequantize_reference(codes, codebooks, scales).double().T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 9, 17])
def test_every_level_gives_the_scalar_bits_and_stays_within_the_bound(config, tokens, always_parallel):
    """Threads split the input groups, so 1 to 4 threads put the splits at many places within
    the chunks of 1, 5, 16 and 64 groups (also more threads than cores: the same bits)."""
    codes, codebooks, scales, bias = random_weight(*config, seed=tokens)
    x = torch.randn(tokens, config[1], generator=torch.Generator().manual_seed(tokens))
    for group in (1, 5, 16, 64):
        reference = run_lutq(x, codes, codebooks, scales, bias, group, "scalar", num_threads=1)
        for level in supported_levels():
            for threads in (1, 2, 3, 4):
                got = run_lutq(x, codes, codebooks, scales, bias, group, level, num_threads=threads)
                assert torch.equal(got, reference), f"simd={level} threads={threads} group={group}"
        error = (reference.double() - formula(x, codes, codebooks, scales, bias)).abs()
        bound = error_bound(x, codes, codebooks, scales, bias, group)
        assert (error <= bound).all(), f"group={group}: error {float((error - bound).max())} above the bound"
        assert float(error.max()) > 0  # the tables really are quantized: a bound that could fail


def test_sums_at_the_largest_chunk_and_table_extremes_stay_exact(always_parallel):
    """Every table entry at +-amax over a chunk of 256 groups, the most one step may cover (E =
    +-32636 of LEVELS = 32639: the rounded inputs and codebooks land 3 steps short; high bytes
    +-127): the int16 sums reach +-127 * 256, and the SIMD kernels' offset bytes
    (csrc/lutq_avx512vbmi.c) sum to 255 * 256, beyond int16 but within uint16."""
    K, ig, groups, M = 256, 8, 256, 2
    codebooks = torch.ones(M, K, 1, ig)
    codebooks[:, K // 2:] = -1  # codewords 0-127 give +8 for an input of ones, 128-255 give -8
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (192, groups, M), generator=generator)
    codes[:64] = 3  # every lookup +127 in the high table
    codes[64:128] = 200  # every lookup -127
    codes, scales = pack_codes(codes, 8), torch.rand(192, 1, 1, 1, generator=generator) + 0.5
    x = torch.ones(2, groups * ig)
    expected = formula(x, codes, codebooks, scales, None)
    reference = run_lutq(x, codes, codebooks, scales, None, groups, "scalar", num_threads=1)
    assert ((reference.double() - expected).abs() <= error_bound(x, codes, codebooks, scales, None, groups)).all()
    for level in supported_levels():
        for threads in (1, 2):
            got = run_lutq(x, codes, codebooks, scales, None, groups, level, num_threads=threads)
            assert torch.equal(got, reference), f"simd={level} threads={threads}"


@pytest.mark.parametrize("level", simd_params())
@pytest.mark.parametrize("x_dtype", list(DTYPES))
@pytest.mark.parametrize("param_dtype", list(DTYPES))
def test_dtypes_match_the_float32_computation(level, x_dtype, param_dtype):
    codes, codebooks, scales, bias = random_weight(130, 96, 2, 8, 8, dtype=DTYPES[param_dtype])
    x = torch.randn(3, 96).to(DTYPES[x_dtype])
    got = run_lutq(x, codes, codebooks, scales, bias, 16, level)
    expected = run_lutq(x.float(), codes, codebooks.float(), scales.float(), bias.float(), 16, "scalar")
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=0, atol=0)


def test_quantized_tables_are_the_default_and_exact_tables_an_option(monkeypatch):
    codes, codebooks, scales, bias = random_weight(200, 96, 2, 4, 8)  # 16 codewords: "lutq" on every SIMD level
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    x = torch.randn(3, 96)  # a few tokens: the quantized tables ("lutq"), or with them off the fp32 tables ("lut")
    quantized = ops.quantized_matmul_cpu(x, codes, codebooks, scales, bias, kernel="lutq")
    exact = ops.quantized_matmul_cpu(x, codes, codebooks, scales, bias, kernel="lut")
    assert not torch.equal(quantized, exact)
    monkeypatch.delenv("AQLM_QUANTIZED_LUT", raising=False)
    assert torch.equal(layer(x), quantized)
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")
    assert torch.equal(layer(x), exact)
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "1")
    assert torch.equal(layer(x), quantized)


def test_default_group_keeps_real_scale_outputs_close_to_the_exact_tables():
    """At ops.LUTQ_GROUP groups per step, inputs with a few outlier channels (as LLM activations
    have) stay within 1e-3 relative error of the exact tables; one int8 table per group did not."""
    codes, codebooks, scales, bias = random_weight(512, 576, 2, 8, 8)
    x = torch.randn(4, 576)
    x[:, ::97] *= 30  # outlier channels
    exact = ops.quantized_matmul_cpu(x, codes, codebooks, scales, None, kernel="lut").double()
    got = run_lutq(x, codes, codebooks, scales, None, ops.LUTQ_GROUP, "scalar").double()
    assert float((got - exact).norm() / exact.norm()) < 1e-3


def test_packed_codes_follow_in_place_changes_of_the_codes(monkeypatch):
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "1")
    codes, codebooks, scales, bias = random_weight(100, 64, 2, 8, 8, seed=1)
    other, _, _, _ = random_weight(100, 64, 2, 8, 8, seed=2)
    layer = QuantizedLinear.from_parts(codes.clone(), codebooks, scales, bias)
    x = torch.randn(1, 64)
    before = layer(x)
    assert torch.equal(layer(x), before)  # second call reuses the packed codes
    with torch.no_grad():
        layer.codes.copy_(other)  # as load_state_dict and PV-tuning do
    expected = QuantizedLinear.from_parts(other, codebooks, scales, bias)(x)
    assert torch.equal(layer(x), expected)


def test_lutq_rejects_what_it_cannot_serve():
    codes, codebooks, scales, bias = random_weight(64, 64, 2, 8, 8)
    x = torch.randn(2, 64)
    for group in (0, 257):
        with pytest.raises(ValueError, match=r"input groups per table scale must be in \[1, 256\]"):
            run_lutq(x, codes, codebooks, scales, bias, group, "scalar")
    packed = ops.packed_codes(codes, codebooks, scales).numpy()
    out = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError, match=r"packed must have shape \(1024,\)"):
        _C.lutq_matmul(x.numpy(), packed[:-1], codebooks.numpy(), scales.numpy(), None, out)
    with pytest.raises(TypeError, match="packed must be a numpy.ndarray of dtype uint8"):
        _C.lutq_matmul(x.numpy(), packed.view(np.int8), codebooks.numpy(), scales.numpy(), None, out)
    wide = pack_codes(torch.randint(0, 2**10, (64, 8, 1)), 10)
    with pytest.raises(ValueError, match="at most 256 codewords"):
        ops.quantized_matmul_cpu(x, wide, torch.randn(1, 2**10, 1, 8), torch.ones(64, 1, 1, 1), None, kernel="lutq")
    grouped = pack_codes(torch.randint(0, 256, (32, 8, 1)), 8)
    with pytest.raises(ValueError, match="out_group_size=1"):
        ops.quantized_matmul_cpu(x, grouped, torch.randn(1, 256, 2, 8), torch.ones(32, 1, 1, 1), None, kernel="lutq")
    with pytest.raises(ValueError, match="kernel must be one of"):
        ops.quantized_matmul_cpu(x, codes, codebooks, scales, bias, kernel="fast")


def test_vbmi_kernels_run_where_the_cpu_has_vbmi_and_vnni():
    flags = open("/proc/cpuinfo").read().split()
    if _C.simd_supported() != "avx512":
        pytest.skip("no AVX-512 here")
    both = "avx512vbmi" in flags and "avx512_vnni" in flags
    assert _C.lutq_kernel(simd="avx512") == ("avx512vbmi" if both else "avx2")
    assert _C.lutq_kernel(simd="scalar") == "scalar"


def test_scales_of_any_shape_give_the_same_result():
    codes, codebooks, scales, bias = random_weight(96, 64, 2, 8, 8)
    x = torch.randn(3, 64)
    expected = ops.quantized_matmul_cpu(x, codes, codebooks, scales, bias, kernel="lutq")
    for shape in [(96,), (96, 1), (1, 96), (96, 1, 1, 1)]:
        got = ops.quantized_matmul_cpu(x, codes, codebooks, scales.reshape(shape), bias, kernel="lutq")
        assert torch.equal(got, expected), shape


def test_lookups_in_several_slabs_of_tables_give_the_bits_of_one_sweep():
    """The lookups sweep the tables a slab (512 KiB, lutq.h) at a time: with 8 codebooks of 256
    codewords, 8 tokens of 2304 inputs take one chunk per slab (18 slabs at 16 groups per step),
    one token 8 chunks per slab. Each token's outputs must not depend on that split."""
    codes, codebooks, scales, bias = random_weight(130, 2304, 8, 8, 8, seed=4)
    x = torch.randn(8, 2304, generator=torch.Generator().manual_seed(4))
    for level in supported_levels():
        together = run_lutq(x, codes, codebooks, scales, bias, 16, level, num_threads=2)
        for t in (0, 5):
            alone = run_lutq(x[t : t + 1], codes, codebooks, scales, bias, 16, level, num_threads=1)
            assert torch.equal(together[t : t + 1], alone), f"simd={level} token {t}"
    error = (together.double() - formula(x, codes, codebooks, scales, bias)).abs()
    assert (error <= error_bound(x, codes, codebooks, scales, bias, 16)).all()


@pytest.mark.parametrize("level", simd_params())
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_codebooks_prepared_once_give_the_same_bits(level, dtype):
    """prepared (the codebooks prepared once, as the eager plan keeps them: lutq.h's int16 pairs,
    the column maxima and largest norms of the bounds, and the column steps) gives the bits of
    the per-call preparation; a wrong size is refused by name."""
    codes, codebooks, scales, bias = random_weight(200, 96, 2, 8, 8, dtype=DTYPES[dtype], seed=4)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(5))
    expected = run_lutq(x, codes, codebooks, scales, bias, 64, level)
    packed = ops.packed_codes(codes, codebooks, scales)
    prepared = ops.lutq_prepare_codebooks(np_view(codebooks), dtype)
    cb = codebooks.float()[:, :, 0, :]  # [M, K, ig]
    M, K, ig = cb.shape
    pairs, levels = (ig + 1) // 2, 2 ** entry_shift(ig) - 1
    assert prepared.shape == (M * pairs * K + M * ig + M + M * ig,)
    column_max = cb.abs().amax(1)  # [M, ig]
    step = column_max / torch.full_like(column_max, levels)
    quantized = torch.round(cb / step[:, None, :]).to(torch.int16)  # [M, K, ig]
    pairs_view = torch.from_numpy(prepared[: M * pairs * K].view(np.int16).copy()).view(M, pairs, K, 2)
    assert torch.equal(pairs_view.permute(0, 2, 1, 3).reshape(M, K, ig), quantized)
    rest = prepared[M * pairs * K :]
    assert np.array_equal(rest[: M * ig], column_max.flatten().numpy())
    np.testing.assert_allclose(rest[M * ig : M * ig + M], cb.double().norm(dim=2).amax(1).numpy(), rtol=1e-6)
    assert np.array_equal(rest[M * ig + M :], step.flatten().numpy())
    out = torch.empty(3, 200)
    args = (x.numpy(), packed.numpy(), np_view(codebooks), np_view(scales), np_view(bias))
    _C.lutq_matmul(*args, out.numpy(), group=64, param_dtype=dtype, simd=level, prepared=prepared)
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"prepared must be a C-contiguous 1-D float32 array of 2082 values"):
        _C.lutq_matmul(*args, out.numpy(), group=64, param_dtype=dtype, prepared=prepared[:-1].copy())
