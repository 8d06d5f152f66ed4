"""Inference kernels and QuantizedLinear against the defining torch formula, at every SIMD level."""
import copy
import functools
import os
import subprocess
import sys

import numpy as np

import pytest
import torch

import aqlm
from aqlm import QuantizedLinear, _C, dequantize_reference, pack_codes
from aqlm.ops import quantized_matmul_torch
from parallel import always_parallel  # noqa: F401 (fixture)

LEVELS = ["scalar", "avx2", "avx512"]
ORDER = {name: index for index, name in enumerate(LEVELS)}


def supported_levels():
    return [level for level in LEVELS if ORDER[level] <= ORDER[_C.simd_supported()]]


def level_param(level):
    reason = f"this CPU supports SIMD only up to {_C.simd_supported()}"
    return pytest.param(level, marks=pytest.mark.skipif(ORDER[level] > ORDER[_C.simd_supported()], reason=reason))


ALL_LEVELS = [level_param(level) for level in LEVELS]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# (out, in, num_codebooks, nbits, out_group_size, in_group_size)
CONFIGS = [
    (64, 48, 1, 8, 1, 8),
    (40, 96, 2, 8, 1, 8),
    (24, 64, 4, 8, 1, 8),
    (16, 64, 8, 8, 1, 8),
    (16, 72, 8, 8, 1, 8),  # 8x8g8 with an odd number of groups (the AVX2 kernel takes groups in pairs)
    (33, 80, 1, 8, 1, 16),
    (40, 48, 3, 4, 2, 6),
    (24, 35, 1, 5, 3, 5),
    (32, 64, 1, 12, 1, 8),
    (24, 48, 2, 16, 1, 8),
    (40, 72, 1, 16, 1, 8),
    (18, 32, 1, 16, 2, 16),
    (16, 20, 2, 3, 1, 4),
]


def random_layer(out, inp, M, nbits, og, ig, dtype=torch.float32, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    K = 2**nbits
    codes = pack_codes(torch.randint(0, K, (out // og, inp // ig, M), generator=generator), nbits)
    codebooks = torch.randn(M, K, og, ig, generator=generator).to(dtype)
    scales = (torch.rand(out // og, 1, 1, 1, generator=generator) + 0.5).to(dtype)
    b = torch.randn(out, generator=generator).to(dtype) if bias else None
    return codes, codebooks, scales, b


def formula(x, codes, codebooks, scales, bias):
    weight = dequantize_reference(codes, codebooks, scales).double()
    y = x.double() @ weight.T
    if bias is not None:
        y = y + bias.double()
    return y


def np_view(t):
    t = t.contiguous()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def tolerance(x_dtype, param_dtype, reference):
    scale = float(reference.abs().max()) + 1.0
    coarse = max(torch.finfo(x_dtype).eps, torch.finfo(param_dtype).eps if param_dtype != torch.float32 else 0)
    return (1e-5 if coarse <= torch.finfo(torch.float32).eps else 2 * coarse) * scale


@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("tokens", [1, 2, 3, 5, 8, 17])
def test_kernels_match_formula(level, config, tokens):
    codes, codebooks, scales, bias = random_layer(*config, seed=tokens)
    x = torch.randn(tokens, config[1], generator=torch.Generator().manual_seed(7))
    reference = formula(x, codes, codebooks, scales, bias)
    out = torch.empty(tokens, config[0])
    args = (np_view(x), np_view(codes), np_view(codebooks), np_view(scales), np_view(bias), out.numpy())
    _C.codebook_matmul(*args, simd=level)
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=tolerance(torch.float32, torch.float32, reference))
    if config[3] <= 8:
        out.zero_()
        _C.lut_matmul(*args, simd=level)
        torch.testing.assert_close(out.double(), reference, rtol=0, atol=tolerance(torch.float32, torch.float32, reference))
    weight = torch.empty(config[0], config[1])
    _C.dequantize(np_view(codes), np_view(codebooks), np_view(scales), weight.numpy(), simd=level)
    torch.testing.assert_close(weight, dequantize_reference(codes, codebooks, scales), rtol=0, atol=1e-6)


@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize("x_dtype", list(DTYPES))
@pytest.mark.parametrize("param_dtype", list(DTYPES))
@pytest.mark.parametrize("config", [CONFIGS[1], CONFIGS[4], CONFIGS[5], CONFIGS[8]], ids=lambda c: "x".join(map(str, c)))
def test_kernels_dtypes(level, x_dtype, param_dtype, config):
    codes, codebooks, scales, bias = random_layer(*config, dtype=DTYPES[param_dtype])
    for tokens in (1, 6):
        x = torch.randn(tokens, config[1], generator=torch.Generator().manual_seed(3)).to(DTYPES[x_dtype])
        reference = formula(x, codes, codebooks, scales, bias)
        out = torch.empty(tokens, config[0], dtype=DTYPES[x_dtype])
        kernels = [_C.codebook_matmul] + ([_C.lut_matmul] if config[3] <= 8 else [])
        for kernel in kernels:
            kernel(np_view(x), np_view(codes), np_view(codebooks), np_view(scales), np_view(bias), np_view(out),
                   x_dtype=x_dtype, param_dtype=param_dtype, simd=level)
            atol = tolerance(DTYPES[x_dtype], DTYPES[param_dtype], reference)
            torch.testing.assert_close(out.double(), reference, rtol=0, atol=atol)
    weight = torch.empty(config[0], config[1], dtype=DTYPES[x_dtype])
    _C.dequantize(np_view(codes), np_view(codebooks), np_view(scales), np_view(weight),
                  param_dtype=param_dtype, out_dtype=x_dtype, simd=level)
    expected = dequantize_reference(codes, codebooks, scales).to(DTYPES[x_dtype])
    assert torch.equal(weight, expected), "dequantize must round exactly like torch's conversion"


# (kernel, (out, in, M, nbits, og, ig), tokens). Work is split in blocks of 16 output groups, so each
# case has at least two blocks per thread of a two-thread team.
THREADED_CASES = [
    # 8-token tables of two 8-bit codebooks take 2 * 256 * 8 floats per input group, so 16 MiB of
    # tables hold 1024 groups: 1088 groups (in_features 8704) need two chunks, and the barrier
    # between building the second chunk and accumulating the first.
    ("lut_matmul", (64, 8704, 2, 8, 1, 8), 8),
    ("lut_matmul", (512, 256, 1, 8, 1, 8), 2),  # one-token tables
    ("lut_matmul", (128, 96, 3, 4, 2, 6), 5),  # generic shapes
    ("codebook_matmul", (512, 256, 2, 8, 1, 8), 9),
    ("codebook_matmul", (128, 256, 1, 16, 1, 8), 3),
    ("codebook_matmul", (128, 96, 3, 4, 2, 6), 5),
    ("dequantize", (512, 256, 2, 8, 1, 8), 0),
    ("dequantize", (128, 96, 3, 4, 2, 6), 0),
]


def run_threaded_case(kernel, config, tokens, simd, threads, x_seed=12):
    """The case's layer (seed 11) applied to an input (seed ``x_seed``) by ``kernel`` at ``simd``,
    into an output filled with NaN (so a value never written cannot pass)."""
    codes, codebooks, scales, bias = random_layer(*config, seed=11)
    weight = (np_view(codes), np_view(codebooks), np_view(scales))
    if kernel == "dequantize":
        out = torch.full((config[0], config[1]), float("nan"))
        _C.dequantize(*weight, out.numpy(), simd=simd, num_threads=threads)
    else:
        x = torch.randn(tokens, config[1], generator=torch.Generator().manual_seed(x_seed))
        out = torch.full((tokens, config[0]), float("nan"))
        getattr(_C, kernel)(np_view(x), *weight, np_view(bias), out.numpy(), simd=simd, num_threads=threads)
    return out


@functools.lru_cache(maxsize=None)
def scalar_reference(kernel, config, tokens):
    """The scalar kernel on one thread, checked against the float64 formula; and the tolerance of
    a comparison with it: float32 rounding of the result (a wrong code, codeword or table entry
    is off by about one unit of x * W, far more)."""
    codes, codebooks, scales, bias = random_layer(*config, seed=11)
    if kernel == "dequantize":
        exact, atol = dequantize_reference(codes, codebooks, scales).double(), 1e-6
    else:
        x = torch.randn(tokens, config[1], generator=torch.Generator().manual_seed(12))
        exact = formula(x, codes, codebooks, scales, bias)
        atol = tolerance(torch.float32, torch.float32, exact)
    scalar = run_threaded_case(kernel, config, tokens, "scalar", 1)
    torch.testing.assert_close(scalar.double(), exact, rtol=0, atol=atol)
    return scalar, atol


@pytest.mark.parametrize("level", ALL_LEVELS)
@pytest.mark.parametrize(
    "kernel, config, tokens", THREADED_CASES, ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v)
)
def test_simd_levels_match_scalar_and_threads_do_not_change_results(level, kernel, config, tokens, always_parallel):
    """Each level on one thread against the scalar kernel; two threads give the same bits as one.
    A decoy call on another input comes first, so that tables a thread fails to build are not
    left over, right by chance, in recycled memory from the single-thread call."""
    scalar, atol = scalar_reference(kernel, config, tokens)
    single = run_threaded_case(kernel, config, tokens, level, 1)
    torch.testing.assert_close(single, scalar, rtol=0, atol=atol, msg=lambda m: f"simd={level} vs scalar: {m}")
    run_threaded_case(kernel, config, tokens, level, 1, x_seed=13)
    threaded = run_threaded_case(kernel, config, tokens, level, always_parallel)
    assert torch.equal(threaded, single), f"simd={level}: two threads changed the result"


def test_min_parallel_work_is_a_checked_process_wide_setting():
    previous = _C.min_parallel_work()
    assert previous == 262144, "the default, unless a test left it changed"
    try:
        _C.set_min_parallel_work(1000)
        assert _C.min_parallel_work() == 1000
        with pytest.raises(ValueError, match="work must be >= 0, got -1"):
            _C.set_min_parallel_work(-1)
        with pytest.raises(TypeError, match="work must be an int, got str"):
            _C.set_min_parallel_work("1000")
        assert _C.min_parallel_work() == 1000
    finally:
        _C.set_min_parallel_work(previous)
    assert _C.parallel_team_size(1) == 1
    with pytest.raises(ValueError, match="num_threads must be >= 1, got 0"):
        _C.parallel_team_size(0)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("shape", [(1,), (3,), (2, 5), (300,)])
@pytest.mark.parametrize("quantized_lut", ["0", "1"])
def test_quantized_linear_cpu_matches_torch_path(config, shape, quantized_lut, monkeypatch):
    """With exact tables to float rounding; with the default quantized tables (16-bit entries, see
    csrc/lutq.h) to 1e-3 of the output's norm; with int8 codebooks (codebooks of more than 256
    codewords, csrc/decodeq.h) or bfloat16 tiles (from 9 tokens on those codebooks, csrc/bf16tile.h)
    the bits of that kernel, which tests/test_decodeq.py and tests/test_bf16tile.py bound."""
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", quantized_lut)
    out, inp, M, nbits, og, ig = config
    codes, codebooks, scales, bias = random_layer(*config)
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    x = torch.randn(*shape, inp)
    y = layer(x)
    assert y.shape == (*shape, out) and y.dtype == x.dtype
    expected = quantized_matmul_torch(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
    if quantized_lut == "0":
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    elif (kernel := aqlm.ops.cpu_kernel_for(x, layer.codes, layer.codebooks, layer.scales, layer.bias)) in ("decodeq", "bf16"):
        flat = x.reshape(-1, inp)
        rounded = aqlm.ops.quantized_matmul_cpu(flat, layer.codes, layer.codebooks, layer.scales, layer.bias, kernel=kernel)
        assert torch.equal(y.reshape(-1, out), rounded)
        assert float((y - expected).norm()) <= {"decodeq": 3e-2, "bf16": 1e-2}[kernel] * float(expected.norm())
    else:
        assert float((y - expected).norm()) <= 1e-3 * float(expected.norm())


@pytest.mark.parametrize("out_group_size", [1, 2])
def test_chunked_dequantize_path_with_bias_matches_formula(monkeypatch, out_group_size):
    """Many tokens go through the dense weight, dequantized in chunks of output groups; with the
    chunk size cut to 10 groups' rows, 96 output groups take 10 chunks (the last one short), each
    with its slice of the bias, and the result is the torch formula's."""
    import aqlm.ops

    out_features = 96 * out_group_size
    codes, codebooks, scales, bias = random_layer(out_features, 64, 2, 8, out_group_size, 8, seed=21)
    x = torch.randn(512, 64, generator=torch.Generator().manual_seed(22))
    row_bytes = 64 * out_group_size * x.element_size()
    monkeypatch.setattr(aqlm.ops, "DEQUANTIZE_CHUNK_BYTES", 10 * row_bytes + row_bytes // 2)
    chunks = []
    dequantize_rows = aqlm.ops._dequantize_cpu_into

    def recording(chunk_codes, *args):
        chunks.append(chunk_codes.shape[0])
        return dequantize_rows(chunk_codes, *args)

    monkeypatch.setattr(aqlm.ops, "_dequantize_cpu_into", recording)
    y = torch.ops.aqlm.quantized_matmul(x, codes, codebooks, scales, bias)
    assert chunks == [10] * 9 + [6], f"512 tokens should take the chunked dequantize path: chunks {chunks}"
    reference = formula(x, codes, codebooks, scales, bias)
    torch.testing.assert_close(y.double(), reference, rtol=0, atol=tolerance(torch.float32, torch.float32, reference))


@pytest.mark.parametrize("kernel", ["lut", "decode", "lutq", "lutw"])
@pytest.mark.parametrize("change", ["codes in place", "codes .data", "codebooks in place", "scales replaced",
                                    "bias in place"])
def test_eager_path_follows_weight_changes(change, kernel, monkeypatch):
    """The eager CPU path caches a plan (and, for "lutq", packed codes) per weight; every kind of
    change to a weight tensor must reach the result, as a fresh layer of the new tensors shows."""
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "1")
    monkeypatch.setenv("AQLM_CPU_KERNEL", kernel)
    layer = QuantizedLinear.from_parts(*random_layer(32, 64, 2, 8, 1, 8))
    other = QuantizedLinear.from_parts(*random_layer(32, 64, 2, 8, 1, 8, seed=5))
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = layer(x)
        if change == "codes in place":
            layer.codes.copy_(other.codes)
        elif change == "codes .data":
            layer.codes.data = other.codes.data.clone()
        elif change == "codebooks in place":
            layer.codebooks.mul_(2)
        elif change == "scales replaced":
            layer.scales = torch.nn.Parameter(other.scales.clone(), requires_grad=False)
        else:
            layer.bias.add_(1)
        after = layer(x)
        fresh = QuantizedLinear.from_parts(*(t.clone() for t in (layer.codes, layer.codebooks, layer.scales, layer.bias)))
        expected = fresh(x)
    assert not torch.equal(after, before)
    assert torch.equal(after, expected), f"{change}: the eager path used a stale plan"


def test_custom_op_checks_an_unchanged_weight_once(monkeypatch):
    """The op's CPU kernel (what torch.compile calls) shares the eager path's cached plan: the
    weight is checked when the plan is built, not again on every call."""
    import aqlm.ops

    layer = QuantizedLinear.from_parts(*random_layer(32, 64, 2, 8, 1, 8))
    checks = []
    check_weight = aqlm.ops.check_weight
    monkeypatch.setattr(aqlm.ops, "check_weight", lambda *args: checks.append(1) or check_weight(*args))
    x = torch.randn(2, 64)
    results = [torch.ops.aqlm.quantized_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
               for _ in range(3)]
    assert len(checks) == 1, f"the weight was checked {len(checks)} times in 3 calls"
    assert all(torch.equal(result, results[0]) for result in results)


@pytest.mark.parametrize("kernel", ["lut", "decode", "lutq", "lutw"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eager_path_float_copies_give_the_parameter_dtype_bits(kernel, dtype, monkeypatch):
    """The eager plan hands the few-token kernels float32 copies of small codebooks, scales and bias;
    the kernels widen 16-bit parameters to float32 anyway, so the bits are those of a call on the
    parameters themselves."""
    monkeypatch.setenv("AQLM_CPU_KERNEL", kernel)
    codes, codebooks, scales, bias = random_layer(96, 64, 2, 8, 1, 8, dtype=dtype, seed=3)
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    x = torch.randn(2, 64)
    expected = aqlm.ops.quantized_matmul_cpu(x, codes, codebooks, scales, bias, kernel=kernel)
    assert torch.equal(layer(x), expected)


def test_eager_cpu_function_accepts_an_input_that_requires_grad(monkeypatch):
    """``ops.quantized_linear_cpu`` computes no gradient, whatever the input and grad mode."""
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")  # exact tables: the comparison below is to float rounding
    layer = QuantizedLinear.from_parts(*random_layer(32, 64, 2, 8, 1, 8))
    x = torch.randn(2, 64, requires_grad=True)
    y = aqlm.ops.quantized_linear_cpu(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
    assert not y.requires_grad
    torch.testing.assert_close(y, quantized_matmul_torch(x.detach(), layer.codes, layer.codebooks, layer.scales,
                                                         layer.bias), rtol=1e-5, atol=1e-4)


def test_quantized_linear_noncontiguous_input_is_handled():
    codes, codebooks, scales, bias = random_layer(32, 64, 2, 8, 1, 8)
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    x = torch.randn(64, 6).T  # non-contiguous [6, 64]
    torch.testing.assert_close(layer(x), layer(x.contiguous()))


@pytest.mark.parametrize("kernel", ["lutq", "lutw", "lut", "decode"])
def test_eager_path_takes_zero_tokens(kernel, monkeypatch):
    """No tokens: an empty output of the right shape, whatever kernel serves the call."""
    monkeypatch.setenv("AQLM_CPU_KERNEL", kernel)
    layer = QuantizedLinear.from_parts(*random_layer(32, 64, 2, 8, 1, 8, seed=5))
    with torch.no_grad():
        for shape in ((0, 64), (2, 0, 64)):
            assert layer(torch.empty(shape)).shape == shape[:-1] + (32,)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["lutq", "lut", "decode"])
def test_eager_path_takes_any_input_layout_and_follows_the_environment(kernel, param_dtype, monkeypatch):
    """The eager no-grad path (a kernel call bound in C on data addresses, one getenv call)
    against the op on contiguous copies, bit for bit, whatever dtype the codebooks are stored in."""
    monkeypatch.setenv("AQLM_CPU_KERNEL", kernel)
    codes, codebooks, scales, bias = random_layer(32, 64, 2, 8, 1, 8, dtype=param_dtype, seed=5)
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    base = torch.randn(4, 3, 128)
    inputs = [base[:, :, ::2], base[:, 1, 64:], base[:, :, :64].transpose(0, 1), torch.randn(2, 64, requires_grad=True),
              torch.randn(1, 1, 64).bfloat16()]
    with torch.no_grad():
        for x in inputs:
            expected = aqlm.ops.quantized_matmul_cpu(x.detach().contiguous(), codes, codebooks, scales, bias, kernel=kernel)
            y = layer(x)
            assert y.shape == x.shape[:-1] + (32,) and y.dtype == x.dtype and y.is_contiguous()
            assert torch.equal(y, expected)
    plan = aqlm.ops._cpu_plan(layer.codes, layer.codebooks, layer.scales, layer.bias)
    assert {key[2][2] for key in plan.calls} == {kernel}  # AQLM_CPU_KERNEL is part of each call's key
    monkeypatch.setenv("AQLM_CPU_KERNEL", "decode" if kernel != "decode" else "lut")
    with torch.no_grad():
        layer(inputs[0])
    assert len({key[2][2] for key in plan.calls}) == 2  # a changed environment is seen at the next call


def test_opcheck_custom_ops():
    for config in (CONFIGS[1], CONFIGS[7]):
        codes, codebooks, scales, bias = random_layer(*config)
        for tokens in (1, 4, 300):
            x = torch.randn(tokens, config[1])
            torch.library.opcheck(torch.ops.aqlm.quantized_matmul, (x, codes, codebooks, scales, bias))
        torch.library.opcheck(torch.ops.aqlm.quantized_matmul, (torch.randn(2, 3, config[1]), codes, codebooks, scales, None))
        torch.library.opcheck(torch.ops.aqlm.dequantize, (codes, codebooks, scales))


def test_autograd_matches_reference_formula():
    codes, codebooks, scales, bias = random_layer(24, 32, 2, 4, 2, 4)
    x = torch.randn(5, 32, requires_grad=True)
    params = [t.clone().requires_grad_(True) for t in (codebooks, scales, bias)]
    y = torch.ops.aqlm.quantized_matmul(x, codes, *params)
    grad_out = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *params], grad_out)
    x2 = x.detach().clone().requires_grad_(True)
    params2 = [t.clone().detach().requires_grad_(True) for t in (codebooks, scales, bias)]
    y2 = x2 @ dequantize_reference(codes, params2[0], params2[1]).T + params2[2]
    expected = torch.autograd.grad(y2, [x2, *params2], grad_out)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_torch_compile_uses_fake_implementation():
    codes, codebooks, scales, bias = random_layer(32, 64, 1, 8, 1, 8)
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), layer(x))


@pytest.mark.parametrize("config", [(1, 8, 1, torch.float32), (2, 8, 1, torch.float16), (1, 8, 2, torch.bfloat16)])
def test_torch_compile_trains_through_the_op(config):
    """Training a compiled model: the backward formula is traced with fake tensors, which the C
    core cannot read, and must give eager's gradients (the same kernels, so the same bits)."""
    M, nbits, og, dtype = config
    layer = QuantizedLinear.from_parts(*random_layer(32, 64, M, nbits, og, 8, dtype=dtype))
    for name in ("codebooks", "scales", "bias"):
        getattr(layer, name).requires_grad_(True)
    twin = copy.deepcopy(layer)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 64, dtype=dtype, requires_grad=True)
    x_twin = x.detach().clone().requires_grad_(True)
    layer(x).float().square().sum().backward()
    compiled(x_twin).float().square().sum().backward()
    for name in ("codebooks", "scales", "bias"):
        assert torch.equal(getattr(twin, name).grad, getattr(layer, name).grad), name
    assert torch.equal(x_twin.grad, x.grad)


# ---- bad input ----------------------------------------------------------------------------


def test_config_that_does_not_divide_features():
    with pytest.raises(ValueError, match="in_group_size 8 does not divide in_features 60"):
        QuantizedLinear(60, 32, 8, 1, 1, 8)
    with pytest.raises(ValueError, match="out_group_size 3 does not divide out_features 32"):
        QuantizedLinear(64, 32, 8, 3, 1, 8)
    with pytest.raises(ValueError, match="nbits_per_codebook"):
        QuantizedLinear(64, 32, 8, 1, 1, 17)
    with pytest.raises(ValueError, match="num_codebooks"):
        QuantizedLinear(64, 32, 8, 1, 0, 8)


def test_wrong_input_shape_and_dtype():
    layer = QuantizedLinear.from_parts(*random_layer(32, 64, 1, 8, 1, 8))
    with pytest.raises(ValueError, match="in_features=64"):
        layer(torch.randn(3, 63))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        layer(torch.randn(3, 64, dtype=torch.float64))
    with pytest.raises(TypeError, match="torch.Tensor"):
        layer([1.0] * 64)


def test_wrong_weight_tensors():
    codes, codebooks, scales, bias = random_layer(32, 64, 2, 8, 1, 8)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="must be torch.int8"):
        torch.ops.aqlm.quantized_matmul(x, codes.to(torch.int32), codebooks, scales, bias)
    with pytest.raises(ValueError, match="codebooks have 2"):
        torch.ops.aqlm.quantized_matmul(x, codes[:, :, :1].contiguous(), codebooks, scales, bias)
    with pytest.raises(ValueError, match="one value per output group"):
        torch.ops.aqlm.quantized_matmul(x, codes, codebooks, scales[:5], bias)
    with pytest.raises(ValueError, match="power of two"):
        torch.ops.aqlm.quantized_matmul(x, codes, codebooks[:, :200], scales, bias)
    with pytest.raises(TypeError, match="scales must have the codebooks' dtype"):
        torch.ops.aqlm.quantized_matmul(x, codes, codebooks, scales.half(), bias)
    with pytest.raises(ValueError, match=r"bias must have shape \(32,\)"):
        torch.ops.aqlm.quantized_matmul(x, codes, codebooks, scales, bias[:4])


def test_codes_out_of_range_are_rejected_on_every_path():
    codes, codebooks, scales, bias = random_layer(16, 32, 1, 4, 1, 8)
    codes[3, 2, 0] = 100  # not a valid 4-bit code in either packed or unpacked form
    x = torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"code out of range for 4-bit codebooks at codes\[3, 2, 0\]: 100"):
        torch.ops.aqlm.quantized_matmul(x, codes, codebooks, scales, bias)
    with pytest.raises(ValueError, match=r"code out of range for 4-bit codebooks at codes\[3, 2, 0\]: 100"):
        quantized_matmul_torch(x, codes, codebooks, scales, bias)
    with pytest.raises(ValueError, match="code out of range"):
        torch.ops.aqlm.dequantize(codes, codebooks, scales)


def test_c_binding_rejects_bad_layouts_and_names_them():
    codes, codebooks, scales, bias = random_layer(32, 64, 2, 8, 1, 8)
    x, out = np.zeros((2, 64), np.float32), np.zeros((2, 32), np.float32)
    args = lambda **kw: {**dict(x=x, codes=codes.numpy(), codebooks=codebooks.numpy(), scales=scales.numpy(), bias=None, out=out), **kw}
    with pytest.raises(ValueError, match="codes must be C-contiguous"):
        _C.lut_matmul(**args(codes=np.asfortranarray(codes.numpy())))
    with pytest.raises(ValueError, match="out must be C-contiguous"):
        _C.lut_matmul(**args(out=np.zeros((32, 2), np.float32).T))
    with pytest.raises(TypeError, match="out must have dtype float32"):
        _C.lut_matmul(**args(out=np.zeros((2, 32), np.float64)))
    with pytest.raises(TypeError, match="x must have dtype float16"):
        _C.lut_matmul(**args(), x_dtype="float16")
    with pytest.raises(ValueError, match="x has 63 features"):
        _C.lut_matmul(**args(x=np.zeros((2, 63), np.float32)))
    with pytest.raises(ValueError, match="x_dtype must be"):
        _C.lut_matmul(**args(), x_dtype="float64")
    with pytest.raises(ValueError, match="unknown SIMD level 'sse9'"):
        _C.lut_matmul(**args(), simd="sse9")
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        _C.lut_matmul(**args(), num_threads=0)
    big = random_layer(16, 32, 1, 12, 1, 8)
    with pytest.raises(ValueError, match="nbits_per_codebook <= 8"):
        _C.lut_matmul(np.zeros((1, 32), np.float32), big[0].numpy(), big[1].numpy(), big[2].numpy(), None,
                      np.zeros((1, 16), np.float32))


@pytest.mark.skipif(_C.simd_supported() == "avx512", reason="needs a CPU without AVX-512")
def test_requesting_unsupported_level_is_an_error():
    codes, codebooks, scales, _ = random_layer(32, 64, 1, 8, 1, 8)
    with pytest.raises(ValueError, match="not available"):
        _C.dequantize(codes.numpy(), codebooks.numpy(), scales.numpy(), np.zeros((32, 64), np.float32), simd="avx512")


def _import_with_env(value):
    env = dict(os.environ, AQLM_SIMD=value)
    code = "import aqlm._C as C; print(C.simd_default())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_override_selects_the_default_level():
    for level in supported_levels():
        result = _import_with_env(level)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == level
    result = _import_with_env("sse9")
    assert result.returncode != 0 and "AQLM_SIMD" in result.stderr and "sse9" in result.stderr


def test_dequantize_op_and_layer_helpers():
    codes, codebooks, scales, bias = random_layer(24, 48, 2, 6, 2, 4)
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, bias)
    torch.testing.assert_close(layer.dequantize(), layer.reference_weight(), rtol=0, atol=1e-6)
    assert layer.scheme.name == "2x6g4o2"
    assert "scheme=2x6g4o2" in repr(layer)


def test_version_is_the_one_in_pyproject():
    """aqlm.__version__ is the project version of pyproject.toml (read here with tomllib)."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert aqlm.__version__ == pyproject["project"]["version"]


@pytest.mark.parametrize("nbits", [1, 4, 7, 8, 12, 15, 16])
def test_torch_path_accepts_every_valid_code_and_rejects_the_rest(nbits):
    """Valid stored codes span [-2**(nbits-1), 2**nbits) wherever that fits the storage dtype."""
    from aqlm.format import check_code_range, code_dtype

    info = torch.iinfo(code_dtype(nbits))
    low, high = -(2 ** (nbits - 1)), min(2**nbits, info.max + 1)
    valid = torch.arange(low, high, dtype=torch.int64).to(code_dtype(nbits)).view(-1, 1, 1)
    check_code_range(valid, nbits)
    if high <= info.max:
        with pytest.raises(ValueError, match="code out of range"):
            check_code_range(torch.tensor([high], dtype=code_dtype(nbits)).view(1, 1, 1), nbits)
