"""Decoding from int8 codebooks ("decodeq": ``_C.decodeq_prepare``, ``_C.decodeq_matmul`` and the
kernel choice around them; csrc/decodeq.h).

Each codebook is rounded to int8 with one step (its largest |value| / 127) and each token to int16
with one step (its largest |value| / 32767); the dot products are exact integers, so every SIMD
level and thread count must give exactly ``rounded_formula``: the same roundings and the same fp32
operations in torch. Against the float64 formula on the unrounded codebooks and activations, each
codebook value moves by at most cstep / 2 and each activation by at most xstep / 2 (plus a few ulps
of the products by the inverses), which bounds each output (``exact_and_bound``).
"""
import numpy as np
import pytest
import torch

from aqlm import QuantizedLinear, _C, ops
from aqlm.format import pack_codes
from aqlm.kernel_choice import cpuinfo_field
from parallel import always_parallel  # noqa: F401 (fixture)
from simd_levels import simd_params, supported_levels

UNIT_ROUNDOFF = 2.0**-24
X_LEVELS, C_LEVELS = 32767, 127
# (out, in, num_codebooks, nbits): in_groups below, at and past multiples of the 2-, 4- and
# 8-group steps and of the 512-group chunk; out not a multiple of the 2-row block. The gather
# kernel takes one codebook of 2**16 codewords: in_groups 10, 517, 6 (one masked step) and 16.
SHAPES = [(33, 80, 1, 16), (7, 8, 1, 9), (40, 96, 2, 10), (17, 4136, 1, 16), (5, 8 * 1029, 1, 12), (64, 48, 3, 11),
          (9, 48, 1, 16), (6, 128, 1, 16)]
TOKENS = [1, 2, 3, 5, 7, 9]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


GATHER = _C.decodeq_kernel("avx512") == "avx512vnni" if "avx512" in supported_levels() else False


@pytest.fixture(params=["gather", "no gather"])
def gather(request, monkeypatch):
    """At the AVX-512 level, up to 2 tokens: the gather kernel where this CPU runs it, and the
    current AVX-512 kernel (AQLM_DECODEQ_GATHER=0); the other levels run alike under both."""
    if request.param == "no gather":
        monkeypatch.setenv("AQLM_DECODEQ_GATHER", "0")
    elif not GATHER:
        pytest.skip("this CPU or build has no gather kernel (an Intel CPU with AVX-512 VNNI)")
    return request.param


def random_layer(out, inp, M, nbits, dtype=torch.float32, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codes = pack_codes(torch.randint(0, 2**nbits, (out, inp // 8, M), generator=generator), nbits)
    codebooks = (torch.randn(M, 2**nbits, 1, 8, generator=generator) * torch.tensor([1.0, 0.1, 3.0])[:M, None, None, None]).to(dtype)
    scales = (torch.rand(out, 1, 1, 1, generator=generator) + 0.5).to(dtype)
    b = torch.randn(out, generator=generator).to(dtype) if bias else None
    return codes, codebooks, scales, b


def view(tensor):
    if tensor is None:
        return None
    return (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()


def run_level(x, codes, codebooks, scales, bias, simd, num_threads=1, prepared=None):
    param_dtype = {v: k for k, v in DTYPES.items()}[codebooks.dtype]
    if prepared is None:
        prepared = _C.decodeq_prepare(view(codebooks), param_dtype=param_dtype)
    out = torch.full((x.shape[0], codes.shape[0]), float("nan"), dtype=x.dtype)
    _C.decodeq_matmul(view(x), view(codes), view(codebooks), view(scales), view(bias), view(out), prepared=prepared,
                      x_dtype={v: k for k, v in DTYPES.items()}[x.dtype], param_dtype=param_dtype, simd=simd,
                      num_threads=num_threads)
    return out


def rounded_codebooks(codebooks):
    """(cq [M, K, 8] as int64, cstep [M] float32), as aqlm_decodeq_prepare rounds them."""
    values = codebooks.float().reshape(codebooks.shape[0], -1)
    largest = values.abs().amax(1, keepdim=True)
    levels = torch.full_like(largest, C_LEVELS)
    inverse = torch.where(largest > 0, levels / largest, torch.zeros_like(largest))
    cq = torch.round(values * inverse).clamp(-C_LEVELS, C_LEVELS).long()
    return cq.reshape(codebooks.shape[0], codebooks.shape[1], 8), (largest / levels).reshape(-1)


def rounded_tokens(x):
    """Each token rounded to int16 as the C core does: (xq as int64, step [n] float32)."""
    x = x.float()
    largest = x.abs().amax(1, keepdim=True)
    levels = torch.full_like(largest, X_LEVELS)
    inverse = torch.where(largest > 0, levels / largest, torch.zeros_like(largest))
    return torch.round(x * inverse).clamp(-X_LEVELS, X_LEVELS).long(), (largest / levels).reshape(-1)


def unpacked(codes, nbits):
    return codes.long() & (2**nbits - 1)


def rounded_formula(x, codes, codebooks, scales, bias):
    """scales * (sum_m step[t, m] * float(dot[t, o, m])) + bias, the integer products exact."""
    M, K = codebooks.shape[:2]
    nbits = K.bit_length() - 1
    cq, cstep = rounded_codebooks(codebooks)
    xq, xstep = rounded_tokens(x)
    index = unpacked(codes, nbits)  # [out, G, M]
    v = None
    for m in range(M):
        words = cq[m][index[:, :, m]].reshape(codes.shape[0], -1)  # [out, in]
        dot = (xq @ words.T).float()
        term = (xstep[:, None] * cstep[m]) * dot
        v = term if v is None else v + term
    shift = 0.0 if bias is None else bias.float()
    return (scales.float().reshape(-1) * v + shift).to(x.dtype)


def exact_and_bound(x, codes, codebooks, scales, bias):
    """The float64 formula on the unrounded x and codebooks, and the bound of both roundings plus
    the fp32 roundings of the last operations."""
    M, K = codebooks.shape[:2]
    nbits = K.bit_length() - 1
    index = unpacked(codes, nbits)
    c = codebooks.double().reshape(M, K, 8)
    _, cstep = rounded_codebooks(codebooks)
    _, xstep = rounded_tokens(x)
    xd = x.double()
    exact = torch.zeros(x.shape[0], codes.shape[0], dtype=torch.float64)
    rounding = torch.zeros_like(exact)
    magnitude = torch.zeros_like(exact)
    for m in range(M):
        words = c[m][index[:, :, m]].reshape(codes.shape[0], -1)
        exact += xd @ words.T
        e_c, e_x = cstep[m].double() * (0.5 + 2.0**-8), xstep.double()[:, None] * (0.5 + 2.0**-8)
        rounding += e_c * xd.abs().sum(1, keepdim=True) + e_x * words.abs().sum(1)[None, :] + e_c * e_x * x.shape[1]
        magnitude += xd.abs() @ words.abs().T
    scale = scales.double().reshape(-1)
    shift = torch.zeros(codes.shape[0], dtype=torch.float64) if bias is None else bias.double()
    exact = scale * exact + shift
    bound = scale.abs() * (rounding + 8 * M * UNIT_ROUNDOFF * magnitude) + 4 * UNIT_ROUNDOFF * shift.abs() + 1e-30
    return exact, bound


@pytest.mark.parametrize("level", simd_params())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("n", TOKENS)
def test_every_level_gives_the_rounded_formula_exactly_and_stays_within_the_bound(level, shape, n, gather):
    codes, codebooks, scales, bias = random_layer(*shape, seed=n)
    x = torch.randn(n, shape[1], generator=torch.Generator().manual_seed(7)) * 3
    got = run_level(x, codes, codebooks, scales, bias, level)
    assert torch.equal(got, rounded_formula(x, codes, codebooks, scales, bias))
    exact, bound = exact_and_bound(x, codes, codebooks, scales, bias)
    assert torch.all((got.double() - exact).abs() <= bound)


@pytest.mark.parametrize("level", supported_levels())
@pytest.mark.parametrize("param_dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("x_dtype", ["float32", "float16", "bfloat16"])
def test_half_precision_codebooks_and_activations(level, param_dtype, x_dtype):
    codes, codebooks, scales, bias = random_layer(21, 8 * 37, 2, 12, dtype=DTYPES[param_dtype], seed=3)
    x = torch.randn(3, 8 * 37, generator=torch.Generator().manual_seed(1)).to(DTYPES[x_dtype])
    got = run_level(x, codes, codebooks, scales, bias, level)
    assert got.dtype == DTYPES[x_dtype]
    assert torch.equal(got, rounded_formula(x, codes, codebooks, scales, bias))


@pytest.mark.parametrize("level", simd_params())
def test_the_largest_products_do_not_overflow_the_integer_lanes(level, gather):
    """Every activation at the token's largest value (xq = 32767) and every codebook value at -max
    (cq = -127): each int32 lane then holds as much as the chunking allows (1029 groups: two chunks
    and a tail); a lane that overflowed would change the sum."""
    groups = 1029
    codes, codebooks, scales, _ = random_layer(3, 8 * groups, 1, 16, seed=5)
    codebooks = -codebooks.abs()
    codebooks[0, :, 0, :] = -2.0
    codes = pack_codes(torch.randint(0, 2**16, (3, groups, 1)), 16)
    x = torch.full((2, 8 * groups), 3.0)  # xq 32767 and -32767: the byte planes' extremes (hi 127 / -128)
    x[1] *= -1
    got = run_level(x, codes, codebooks, torch.ones_like(scales), None, level)
    assert torch.equal(got, rounded_formula(x, codes, codebooks, torch.ones_like(scales), None))
    smallest = float(codebooks.min())
    assert got[0, 0] == pytest.approx(smallest * 3.0 * 8 * groups, rel=1e-6)
    assert got[1, 0] == pytest.approx(-smallest * 3.0 * 8 * groups, rel=1e-6)


@pytest.mark.parametrize("level", supported_levels())
def test_a_token_with_nan_or_infinity_gives_nan_and_a_zero_token_gives_the_bias(level):
    codes, codebooks, scales, bias = random_layer(9, 72, 1, 16, seed=2)
    x = torch.randn(4, 72)
    x[1, 5], x[2, 71] = float("nan"), float("-inf")
    x[3] = 0.0
    got = run_level(x, codes, codebooks, scales, bias, level)
    assert torch.equal(got[0], rounded_formula(x[:1], codes, codebooks, scales, bias)[0])
    assert torch.isnan(got[1:3]).all()
    assert torch.equal(got[3], bias)


@pytest.mark.parametrize("level", supported_levels())
@pytest.mark.parametrize("tokens", [1, 5])
def test_thread_count_does_not_change_the_bits(level, tokens, always_parallel, gather):
    codes, codebooks, scales, bias = random_layer(301, 8 * 70, 1, 16, seed=3)
    x = torch.randn(tokens, 8 * 70)
    one = run_level(x, codes, codebooks, scales, bias, level, num_threads=1)
    assert torch.equal(run_level(x, codes, codebooks, scales, bias, level, num_threads=2), one)
    assert torch.equal(run_level(x, codes, codebooks, scales, bias, level, num_threads=3), one)


def test_the_gather_kernel_serves_up_to_two_tokens_where_the_cpu_has_it(monkeypatch):
    flags = (cpuinfo_field("flags") or "").split()
    intel_vnni = cpuinfo_field("vendor_id") == "GenuineIntel" and "avx512_vnni" in flags and "avx512" in supported_levels()
    assert GATHER == intel_vnni
    expected = "avx512vnni" if intel_vnni else "avx512"
    if "avx512" in supported_levels():
        assert [_C.decodeq_kernel("avx512", tokens=n) for n in (1, 2, 3, 8)] == [expected, expected, "avx512", "avx512"]
        monkeypatch.setenv("AQLM_DECODEQ_GATHER", "0")
        assert _C.decodeq_kernel("avx512", tokens=1) == "avx512"
    assert _C.decodeq_kernel("scalar") == "scalar"
    with pytest.raises(ValueError, match="tokens must be >= 1, got 0"):
        _C.decodeq_kernel(tokens=0)


def test_prepare_rounds_each_codebook_with_its_own_step():
    _, codebooks, _, _ = random_layer(4, 16, 3, 9, seed=4)
    prepared = _C.decodeq_prepare(codebooks.numpy())
    cq, cstep = rounded_codebooks(codebooks)
    assert prepared.dtype == np.int8 and prepared.shape == (64 + 3 * 512 * 8,)
    assert np.array_equal(prepared[:12].view(np.float32), cstep.numpy())
    assert np.array_equal(prepared[64:], cq.reshape(-1).numpy().astype(np.int8))
    zero = _C.decodeq_prepare(np.zeros((1, 512, 1, 8), np.float32))
    assert zero[:4].view(np.float32)[0] == 0.0 and not zero[64:].any()


def test_bad_arguments_raise_errors_that_name_them():
    codes, codebooks, scales, bias = random_layer(8, 16, 1, 16)
    x, out = np.zeros((1, 16), np.float32), np.zeros((1, 8), np.float32)
    prepared = _C.decodeq_prepare(codebooks.numpy())
    args = (x, codes.numpy(), codebooks.numpy(), scales.numpy(), None, out)
    with pytest.raises(TypeError, match="needs prepared="):
        _C.decodeq_matmul(*args)
    with pytest.raises(ValueError, match="prepared must be a C-contiguous 1-D int8 array of 524352 values"):
        _C.decodeq_matmul(*args, prepared=prepared[:-1])
    with pytest.raises(ValueError, match="prepared must be"):
        _C.decodeq_matmul(*args, prepared=prepared.view(np.uint8))
    with pytest.raises(ValueError, match="prepared must be a C-contiguous 1-D int8 array"):
        _C.decodeq_matmul(*args, prepared=None)
    with pytest.raises(ValueError, match=r"codebooks must have shape \[M, K, 1, 8\] with K a power of two in \[512, 65536\], got \[1, 256, 1, 8\]"):
        _C.decodeq_prepare(np.zeros((1, 256, 1, 8), np.float32))
    with pytest.raises(ValueError, match=r"got \[1, 512, 1, 4\]"):
        _C.decodeq_prepare(np.zeros((1, 512, 1, 4), np.float32))
    bad = codebooks.numpy().copy()
    bad[0, 700, 0, 3] = np.inf
    with pytest.raises(ValueError, match="codebook 0 has a non-finite value at codeword 700, input 3"):
        _C.decodeq_prepare(bad)
    wide = random_layer(8, 16, 1, 8)
    with pytest.raises(ValueError, match="kernel='decodeq' needs codebooks of more than 256 codewords"):
        ops.quantized_matmul_cpu(torch.zeros(1, 16), *wide, kernel="decodeq")
    with pytest.raises(ValueError, match="out must not overlap prepared"):
        _C.decodeq_matmul(x, codes.numpy(), codebooks.numpy(), scales.numpy(), None, prepared[64:96].view(np.float32)[None],
                          prepared=prepared)


def test_the_kernel_choice_takes_int8_codebooks_unless_exact(monkeypatch):
    assert ops.choose_cpu_kernel(1, 1, 16, 1, 8) == "decodeq"
    assert ops.choose_cpu_kernel(2, 2, 12, 1, 8) == "decodeq"
    assert ops.choose_cpu_kernel(8, 1, 16, 1, 8) == "decodeq"
    assert ops.choose_cpu_kernel(1, 1, 16, 1, 8, exact=True) == "decode"
    assert ops.choose_cpu_kernel(1, 1, 16, 1, 4) == "decode"
    assert ops.choose_cpu_kernel(1, 1, 16, 2, 8) == "decode"
    assert "decodeq" in ops.applicable_cpu_kernels(3, 16, 1, torch.float32, exact=False, in_group_size=8)
    assert "decodeq" not in ops.applicable_cpu_kernels(3, 16, 1, torch.float32, exact=True, in_group_size=8)
    assert "decodeq" not in ops.applicable_cpu_kernels(3, 8, 1, torch.float32, exact=False, in_group_size=8)
    monkeypatch.setenv("AQLM_KERNEL_CALIBRATION", "0")
    codes, codebooks, scales, bias = random_layer(16, 64, 1, 16)
    x = torch.randn(2, 64)
    assert ops.cpu_kernel_for(x, codes, codebooks, scales, bias) == "decodeq"
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")
    assert ops.cpu_kernel_for(x, codes, codebooks, scales, bias) == "decode"


@pytest.mark.parametrize("tokens", [1, 4])
def test_the_layer_the_bound_call_and_the_direct_call_give_the_same_bits(tokens, monkeypatch):
    monkeypatch.setenv("AQLM_KERNEL_CALIBRATION", "0")
    codes, codebooks, scales, bias = random_layer(40, 96, 1, 16, dtype=torch.float16, seed=9)
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    x = torch.randn(tokens, 96)
    expected = run_level(x, codes, codebooks, scales, bias, _C.simd_default(), num_threads=torch.get_num_threads())
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    assert torch.equal(ops.quantized_matmul_cpu(x, codes, codebooks, scales, bias, kernel="decodeq"), expected)
    out = torch.empty(tokens, 40)
    ops.bound_linear_cpu(x, out, codes, codebooks, scales, bias, prefer="decodeq")()
    assert torch.equal(out, expected)


def test_codebooks_with_a_non_finite_value_are_decoded_exactly(monkeypatch):
    monkeypatch.setenv("AQLM_KERNEL_CALIBRATION", "0")
    codes, codebooks, scales, bias = random_layer(16, 64, 1, 16, seed=1)
    codebooks[0, 12345, 0, 0] = float("inf")  # a codeword no code uses
    codes = torch.where(codes == 12345, torch.zeros_like(codes), codes)
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    x = torch.randn(1, 64)
    exact = ops.quantized_matmul_cpu(x, codes, codebooks, scales, bias, kernel="decode")
    with torch.no_grad():
        assert torch.equal(layer(x), exact)
    assert torch.equal(ops.quantized_matmul_cpu(x, codes, codebooks, scales, bias, kernel="decodeq"), exact)
