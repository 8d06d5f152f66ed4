"""Bfloat16 tiles (``_C.bf16_matmul``, csrc/bf16tile.h): codewords and tokens rounded to bfloat16,
products summed in float32, by AMX where this CPU and OS run it, else by AVX-512 BF16, else by
the scalar reference (each kernel this machine runs is tested; AQLM_AMX=0 selects AVX-512 BF16
on an AMX CPU).

Each codeword and activation is rounded to bfloat16 (nearest even); the products of two bfloat16
values are exact in float32, so only the order and rounding of the float32 sums differ between
the kernels. Each must match the float64 product of the rounded operands within the float32
summation bound of bf16tile.h, |acc - exact| <= gamma(M * in) * sum |w| |x| with
gamma(n) = n u / (1 - n u), u = 2^-24, plus the output's own rounding.
"""
import pytest
import torch

from aqlm import _C, QuantizedLinear, ops
from parallel import always_parallel  # noqa: F401 (fixture)
from test_lutq import call_matmul, random_weight

KERNEL = _C.bf16_kernel()  # "amx", "avx512bf16" or "scalar"
needs_simd = pytest.mark.skipif(KERNEL == "scalar", reason="this CPU, OS or build has neither AMX-BF16 nor AVX-512 BF16")
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}

# (out, in, num_codebooks, nbits, in_group_size): 1x16g8, 2x8g8, nibble-sized 4x4g8, groups of 4,
# 16 and 32 (8, 2 and 1 codewords per 32-input panel row), rows not a multiple of 16 (zero rows
# in the last panel), fewer rows than one panel, one chunk of 32 inputs, 8 codebooks (one
# chunk per block of panels), and a wide row (several blocks of chunks).
CONFIGS = [
    (100, 64, 1, 16, 8),
    (200, 96, 2, 8, 8),
    (130, 256, 4, 4, 8),
    (70, 64, 2, 8, 4),
    (48, 96, 1, 8, 16),
    (40, 64, 1, 6, 32),
    (5, 32, 2, 8, 8),
    (33, 64, 8, 8, 8),
    (112, 1024, 2, 8, 8),
]
TOKENS = [1, 4, 15, 16, 17, 40, 64, 65, 130]


@pytest.fixture(params=["scalar", "amx", "avx512bf16"])
def kernel(request, monkeypatch):
    """Each bfloat16 tile kernel this machine runs (AVX-512 BF16 on an AMX CPU with AQLM_AMX=0);
    yields the SIMD level that selects it."""
    if request.param != "scalar":
        if request.param == "avx512bf16":
            monkeypatch.setenv("AQLM_AMX", "0")
        if _C.bf16_kernel("avx512") != request.param:
            pytest.skip(f"this CPU, OS or build cannot run the {request.param} kernels")
    return "scalar" if request.param == "scalar" else "avx512"


def run_bf16(x, codes, codebooks, scales, bias, simd, num_threads=2):
    return call_matmul(_C.bf16_matmul, x, codes, codes.shape[0], codebooks, scales, bias, simd, num_threads)


def rounded_terms(x, codes, codebooks):
    """The bfloat16-rounded codewords of each codebook [M, out, in] and tokens [n, in], as float64."""
    M, K, _, ig = codebooks.shape
    nbits = K.bit_length() - 1
    unpacked = ops.unpack_codes(codes, nbits).long()  # [out, G, M]
    rounded = codebooks.float().bfloat16().double()[:, :, 0, :]  # [M, K, ig]
    words = torch.stack([rounded[m][unpacked[:, :, m]].reshape(codes.shape[0], -1) for m in range(M)])
    return words, x.float().bfloat16().double()


def exact_and_bound(x, codes, codebooks, scales, bias):
    """The float64 product of the rounded operands (scaled, biased) and the bound on a result's error."""
    words, xs = rounded_terms(x, codes, codebooks)
    scale = scales.double().view(1, -1)
    exact = torch.einsum("ti,moi->to", xs, words) * scale
    magnitude = torch.einsum("ti,moi->to", xs.abs(), words.abs()) * scale.abs()
    n = words.shape[0] * words.shape[2]
    gamma = n * 2.0**-24 / (1 - n * 2.0**-24)
    bias_part = 0 if bias is None else bias.double()
    exact = exact + bias_part
    # the sums, the flushed denormals, the scale and bias in float32, then the output's rounding
    bound = gamma * magnitude + n * 2.0**-126 + 4 * 2.0**-24 * (magnitude + abs(bias_part))
    bound = bound + UNIT_ROUNDOFF[x.dtype] * (exact.abs() + bound)
    return exact, bound


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("tokens", TOKENS)
def test_every_kernel_matches_the_rounded_product_within_the_bound(config, tokens, kernel, always_parallel):
    codes, codebooks, scales, bias = random_weight(*config, dtype=torch.float16, seed=tokens)
    x = torch.randn(tokens, config[1], generator=torch.Generator().manual_seed(tokens))
    exact, bound = exact_and_bound(x, codes, codebooks, scales, bias)
    for threads in (1, 2, 3):
        got = run_bf16(x, codes, codebooks, scales, bias, kernel, num_threads=threads)
        error = (got.double() - exact).abs()
        assert (error <= bound).all(), f"threads={threads}: error {float((error - bound).max())} above the bound"
    # the rounding to bfloat16 is real: the float32 formula is further off than the bound allows
    full = x.double() @ ops.dequantize_reference(codes, codebooks.float(), scales.float()).double().T + bias.double()
    assert float(((full - exact).abs() - bound).max()) > 0


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
def test_every_dtype_and_no_bias(x_dtype, param_dtype, with_bias, kernel):
    codes, codebooks, scales, bias = random_weight(70, 96, 2, 8, 8, dtype=param_dtype, seed=3)
    bias = bias if with_bias else None
    x = torch.randn(20, 96, generator=torch.Generator().manual_seed(3)).to(x_dtype)
    exact, bound = exact_and_bound(x, codes, codebooks, scales, bias)
    error = (run_bf16(x, codes, codebooks, scales, bias, kernel).double() - exact).abs()
    assert (error <= bound).all(), f"error {float((error - bound).max())} above the bound"


@pytest.mark.parametrize(
    "shape, message",
    [
        ((16, 40, 1, 8, 8), "in_features divisible by 32"),
        ((16, 36, 1, 8, 12), "even in_group_size that divides 32"),
        ((16, 32, 1, 8, 1), "even in_group_size that divides 32"),
    ],
)
def test_unsupported_formats_are_refused_by_name(shape, message):
    codes, codebooks, scales, bias = random_weight(*shape)
    with pytest.raises(ValueError, match=message):
        run_bf16(torch.randn(4, shape[1]), codes, codebooks, scales, bias, None)


def test_output_groups_are_refused():
    codes, codebooks, scales, _ = random_weight(16, 64, 1, 8, 8)
    codebooks = codebooks.repeat(1, 1, 2, 1)  # out_group_size 2
    out = torch.empty(4, 32)
    with pytest.raises(ValueError, match="out_group_size 1"):
        _C.bf16_matmul(torch.randn(4, 64).numpy(), codes.numpy(), codebooks.numpy(), scales.numpy(), None, out.numpy())


def test_bf16_is_a_candidate_only_where_bfloat16_rounding_is_acceptable():
    args = dict(tokens=16, out_group_size=1, in_group_size=8, in_features=4096)
    runs = KERNEL != "scalar"
    assert ops.bf16_tiles_apply(input_dtype=torch.bfloat16, bf16=False, **args) == runs
    assert ops.bf16_tiles_apply(input_dtype=torch.float32, bf16=True, **args) == runs
    assert not ops.bf16_tiles_apply(input_dtype=torch.float32, bf16=False, **args)  # exact unless asked
    assert not ops.bf16_tiles_apply(input_dtype=torch.bfloat16, bf16=False, **{**args, "tokens": ops.BF16_TILE_MIN_TOKENS - 1})
    assert not ops.bf16_tiles_apply(input_dtype=torch.bfloat16, bf16=False, **{**args, "out_group_size": 2})
    assert not ops.bf16_tiles_apply(input_dtype=torch.bfloat16, bf16=False, **{**args, "in_features": 4080})
    assert not ops.bf16_tiles_apply(input_dtype=torch.bfloat16, bf16=False, **{**args, "in_group_size": 1})


@needs_simd
def test_fixed_rules_take_bf16_for_65536_codewords_within_its_token_range():
    first, last = ops.BF16_TILE_TOKENS[KERNEL]
    assert ops.choose_cpu_kernel(first, 1, 16, 1, 8, exact=True, bf16_tiles=True) == "bf16"
    after_decodeq = max(first, ops.DECODEQ_FIRST_TOKENS + 1)
    assert ops.choose_cpu_kernel(after_decodeq - 1, 1, 16, 1, 8, bf16_tiles=True) == "decodeq"
    assert ops.choose_cpu_kernel(after_decodeq, 1, 16, 1, 8, bf16_tiles=True) == "bf16"
    assert ops.choose_cpu_kernel(last, 1, 16, 1, 8, bf16_tiles=True) == "bf16"
    assert ops.choose_cpu_kernel(last + 1, 1, 16, 1, 8, bf16_tiles=True) != "bf16"
    assert ops.choose_cpu_kernel(16, 1, 16, 1, 8, bf16_tiles=False) != "bf16"
    assert ops.choose_cpu_kernel(16, 2, 8, 1, 8, bf16_tiles=True) != "bf16"  # 256 codewords: the exact tables


def test_bf16_tiles_are_candidates_for_float32_activations_where_int8_codebooks_are():
    """Where "decodeq" rounds codebooks of more than 256 codewords by default (few tokens, not
    exact), the bfloat16 tiles may too; elsewhere float32 activations keep them opt-in."""
    serves = _C.bf16_kernel() != "scalar"

    def candidates(tokens, nbits=16, exact=False, bf16=False, in_group_size=8):
        return ops.applicable_cpu_kernels(tokens, nbits, 1, torch.float32, exact, bf16, in_group_size, 4096)

    assert ("bf16" in candidates(16)) == serves and "decodeq" in candidates(16)
    assert ("bf16" in candidates(ops.FEW_TOKENS)) == serves
    assert "bf16" not in candidates(16, exact=True)
    assert "bf16" not in candidates(ops.FEW_TOKENS + 1)
    assert ("bf16" in candidates(ops.FEW_TOKENS + 1, bf16=True)) == serves
    assert "bf16" not in candidates(16, nbits=8) and "bf16" not in candidates(16, in_group_size=4)
    assert ops.rounds_few_token_codebooks(16, 12, 1, 8, exact=False)
    assert not ops.rounds_few_token_codebooks(16, 12, 2, 8, exact=False)


@needs_simd
def test_float32_layer_uses_the_tiles_for_1x16_at_16_tokens_by_default(monkeypatch):
    """Fixed rules, as the tests run: 16 float32 tokens on a 1x16g8 layer go to the tiles unless
    AQLM_QUANTIZED_LUT=0, within the bound of the product of the bfloat16-rounded operands."""
    monkeypatch.setenv("AQLM_KERNEL_CALIBRATION", "0")
    layer = QuantizedLinear(128, 96, in_group_size=8, out_group_size=1, num_codebooks=1, nbits_per_codebook=16,
                            bias=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.codes.copy_(torch.randint(-2**15, 2**15, layer.codes.shape, generator=generator, dtype=torch.int16))
        layer.codebooks.copy_(torch.randn(layer.codebooks.shape, generator=generator))
        layer.scales.copy_(torch.rand(layer.scales.shape, generator=generator) + 0.5)
    x = torch.randn(16, 128, generator=generator)
    calls = []
    monkeypatch.setattr(_C, "bind_matmul", lambda kernel, *a, _real=_C.bind_matmul, **k: calls.append(kernel) or _real(kernel, *a, **k))
    with torch.no_grad():
        y = layer(x)
        monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")
        layer(x)
    assert calls == ["bf16", "decode"]
    exact, bound = exact_and_bound(x, layer.codes, layer.codebooks, layer.scales, None)
    assert ((y.double() - exact).abs() <= bound).all()


@needs_simd
def test_bfloat16_layer_uses_the_tiles_for_1x16_and_matches_its_rounded_product(monkeypatch):
    """A bfloat16 QuantizedLinear with one 2**16-codeword codebook, 16 tokens, fixed rules (as
    the tests run): the tiles serve it, within the bound of the product of its rounded operands."""
    monkeypatch.setenv("AQLM_KERNEL_CALIBRATION", "0")
    layer = QuantizedLinear(128, 96, in_group_size=8, out_group_size=1, num_codebooks=1, nbits_per_codebook=16,
                            bias=True, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.codes.copy_(torch.randint(-2**15, 2**15, layer.codes.shape, generator=generator, dtype=torch.int16))
        layer.codebooks.copy_(torch.randn(layer.codebooks.shape, generator=generator))
        layer.scales.copy_(torch.rand(layer.scales.shape, generator=generator) + 0.5)
        layer.bias.copy_(torch.randn(96, generator=generator))
    x = torch.randn(2, 8, 128, generator=generator).bfloat16()
    calls = []
    monkeypatch.setattr(_C, "bind_matmul", lambda kernel, *a, _real=_C.bind_matmul, **k: calls.append(kernel) or _real(kernel, *a, **k))
    with torch.no_grad():
        y = layer(x)
    assert calls == ["bf16"], "the bfloat16 tiles did not serve a 16-token bfloat16 call"
    exact, bound = exact_and_bound(x.reshape(16, 128), layer.codes, layer.codebooks, layer.scales, layer.bias)
    assert ((y.reshape(16, 96).double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("config", [(100, 64, 1, 16, 8), (70, 64, 2, 12, 8), (200, 96, 2, 8, 8)],
                         ids=lambda c: "x".join(map(str, c)))
def test_prepared_codebooks_are_torch_bfloat16_and_give_the_same_bits(config, dtype, kernel):
    codes, codebooks, scales, bias = random_weight(*config, dtype=dtype, seed=5)
    codebooks[0, 1, 0, :4] = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, -(1 + 2.0**-8), 2.0**-130]).to(dtype)  # ties, a denormal
    names = {torch.float16: "float16", torch.float32: "float32"}
    prepared = _C.bf16_prepare(codebooks.numpy(), param_dtype=names[dtype])
    assert prepared.dtype == "uint16" and prepared.shape == (codebooks.numel(),)
    assert torch.equal(torch.from_numpy(prepared.view("int16")), codebooks.bfloat16().view(torch.int16).reshape(-1))
    x = torch.randn(20, config[1], generator=torch.Generator().manual_seed(1))
    converted = run_bf16(x, codes, codebooks, scales, bias, kernel)
    read = call_matmul(_C.bf16_matmul, x, codes, codes.shape[0], codebooks, scales, bias, kernel, 2, prepared=prepared)
    assert torch.equal(read, converted)
    prepared[:] = 0  # what is read is the prepared copy
    zeroed = call_matmul(_C.bf16_matmul, x, codes, codes.shape[0], codebooks, scales, bias, kernel, 2, prepared=prepared)
    assert torch.equal(zeroed, bias.expand_as(zeroed))


def test_wrong_prepared_codebooks_are_refused():
    codes, codebooks, scales, bias = random_weight(40, 64, 1, 12, 8, dtype=torch.float16)
    x = torch.randn(4, 64)
    good = _C.bf16_prepare(codebooks.numpy(), param_dtype="float16")
    for bad in (good[:-1], good.view("int16"), good.astype("float32")):
        with pytest.raises(ValueError, match=r"prepared must be a C-contiguous 1-D uint16 array of 32768 values \(from bf16_prepare"):
            call_matmul(_C.bf16_matmul, x, codes, 40, codebooks, scales, bias, None, 1, prepared=bad)
        with pytest.raises(ValueError, match="prepared must be a C-contiguous 1-D uint16 array"):
            _C.bind_matmul("bf16", x.numpy(), codes.numpy(), codebooks.numpy(), scales.numpy(), bias.numpy(),
                           torch.empty(4, 40).numpy(), param_dtype="float16", prepared=bad)
    with pytest.raises(ValueError, match=r"codebooks must have shape \[M, K, 1, in_group_size\]"):
        _C.bf16_prepare(torch.zeros(1, 100, 1, 8).numpy())


@needs_simd
@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_layer_binds_the_prepared_codebooks_of_1x16(param_dtype, monkeypatch):
    """The layer's bound "bf16" call reads codebooks rounded once (not for bfloat16 ones, read in
    place), with the bits of the kernel that rounds them at each call."""
    monkeypatch.setenv("AQLM_KERNEL_CALIBRATION", "0")
    codes, codebooks, scales, bias = random_weight(96, 128, 1, 16, 8, dtype=param_dtype, seed=2)
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    bound = []
    monkeypatch.setattr(_C, "bind_matmul", lambda kernel, *a, _real=_C.bind_matmul, **k: bound.append((kernel, k.get("prepared"))) or _real(kernel, *a, **k))
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(3)).to(param_dtype)
    with torch.no_grad():
        y = layer(x)
    assert [kernel for kernel, _ in bound] == ["bf16"]
    assert (bound[0][1] is None) == (param_dtype == torch.bfloat16)
    assert torch.equal(y, ops.quantized_matmul_cpu(x, layer.codes, layer.codebooks, layer.scales, layer.bias, kernel="bf16"))
