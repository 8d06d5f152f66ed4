"""Weight-only int8 rows (``_C.int8_matmul``, ``_C.int8_quantize_rows`` and their ``aqlm.ops`` wrappers).

Each token's activations are rounded to int16 (one step per token) and the dot products are
exact integers, so every SIMD level must give exactly ``rounded_formula``: the same rounding and
the same four fp32 operations in torch. Against the float64 formula on the unrounded x, the
rounding moves each x by at most step / 2 (plus a few ulps of x * inverse), so a row is off by at
most |scale| * step * (1/2 + 2**-8) * sum |q|, plus the fp32 roundings of the last operations.
"""
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from aqlm import _C, ops
from parallel import always_parallel  # noqa: F401 (fixture)
from simd_levels import simd_params, supported_levels

UNIT_ROUNDOFF = 2.0**-24
X_LEVELS = 32767

# (in_features, out_features): in below, at and past multiples of 16/32 and of the 4096-input
# chunk; out not a multiple of the 4-row block.
SHAPES = [(576, 300), (37, 17), (1, 5), (15, 130), (17, 67), (64, 64), (129, 33), (100, 9), (4133, 6)]
TOKENS = [1, 3, 8, 17]


def random_problem(n, inp, out, seed=0, with_bias=True):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, inp, generator=generator)
    q, scales = ops.int8_quantize_rows(weight)
    x = torch.randn(n, inp, generator=generator)
    bias = torch.randn(out, generator=generator) if with_bias else None
    return x, q, scales, bias


def run_level(x, q, scales, bias, simd, num_threads=1):
    out = np.full((x.shape[0], q.shape[0]), np.nan, np.float32)
    _C.int8_matmul(x.numpy(), q.numpy(), scales.numpy(), None if bias is None else bias.numpy(), out,
                   simd=simd, num_threads=num_threads)
    return torch.from_numpy(out)


def rounded_tokens(x):
    """Each token rounded to int16 as the C core does: (xq as int64, step [n, 1] float32)."""
    largest = x.abs().amax(1, keepdim=True)
    levels = torch.full_like(largest, X_LEVELS)  # torch divides by a Python scalar as a multiply by its inverse
    inverse = torch.where(largest > 0, levels / largest, torch.zeros_like(largest))
    return torch.round(x * inverse).clamp(-X_LEVELS, X_LEVELS).long(), largest / levels


def rounded_formula(x, q, scales, bias):
    """scales * (step * float(xq @ q.T)) + bias, the integer product exact."""
    xq, step = rounded_tokens(x)
    dot = (xq @ q.long().T).float()
    return scales * (step * dot) + (0.0 if bias is None else bias)


def exact_and_bound(x, q, scales, bias):
    """The float64 formula on the unrounded x and the bound of the int16 rounding plus fp32 roundings."""
    terms = x.double()[:, None, :] * q.double()[None, :, :]
    shift = torch.zeros(q.shape[0], dtype=torch.float64) if bias is None else bias.double()
    exact = scales.double() * terms.sum(-1) + shift
    _, step = rounded_tokens(x)
    rounding = scales.double().abs() * step.double() * (0.5 + 2.0**-8) * q.double().abs().sum(1)
    bound = rounding + 8 * UNIT_ROUNDOFF * (scales.double().abs() * terms.abs().sum(-1) + shift.abs()) + 1e-30
    return exact, bound


@pytest.mark.parametrize("level", simd_params())
@pytest.mark.parametrize("shape", SHAPES, ids=[f"in{i}-out{o}" for i, o in SHAPES])
@pytest.mark.parametrize("n", TOKENS)
def test_every_level_gives_the_rounded_formula_exactly_and_stays_near_the_unrounded_one(level, shape, n):
    inp, out = shape
    x, q, scales, bias = random_problem(n, inp, out, seed=inp * 1000 + out + n)
    got = run_level(x, q, scales, bias, level)
    assert torch.equal(got, rounded_formula(x, q, scales, bias))
    exact, bound = exact_and_bound(x, q, scales, bias)
    assert torch.all((got.double() - exact).abs() <= bound)


@pytest.mark.parametrize("level", simd_params())
def test_the_largest_products_do_not_overflow_the_integer_lanes(level):
    """Every x at the token's largest value (xq = 32767) and every weight -128: each int32 lane
    then holds as much as the chunking allows; a lane that overflowed would change the sum."""
    inp = 2 * 4096 + 37
    x = torch.full((2, inp), 3.0)
    x[1] *= -1
    q = torch.full((3, inp), -128, dtype=torch.int8)
    scales = torch.tensor([1.0, 0.5, 2.0])
    got = run_level(x, q, scales, None, level)
    assert torch.equal(got, rounded_formula(x, q, scales, None))
    assert got[0, 0] == pytest.approx(-128 * 3.0 * inp, rel=1e-6)


@pytest.mark.parametrize("level", supported_levels())
def test_a_token_with_nan_or_infinity_gives_nan_and_a_zero_token_gives_the_bias(level):
    x, q, scales, bias = random_problem(4, 70, 9, seed=2)
    x[1, 5], x[2, 69] = float("nan"), float("-inf")
    x[3] = 0.0
    got = run_level(x, q, scales, bias, level)
    assert torch.equal(got[0], rounded_formula(x[:1], q, scales, bias)[0])
    assert torch.isnan(got[1:3]).all()
    assert torch.equal(got[3], bias)


@pytest.mark.parametrize("level", supported_levels())
def test_without_bias_and_with_no_tokens(level):
    x, q, scales, _ = random_problem(5, 70, 41, with_bias=False)
    assert torch.equal(run_level(x, q, scales, None, level), rounded_formula(x, q, scales, None))
    assert run_level(x[:0], q, scales, None, level).shape == (0, 41)


@pytest.mark.parametrize("level", supported_levels())
def test_thread_count_does_not_change_the_bits(level, always_parallel):
    x, q, scales, bias = random_problem(11, 200, 1000, seed=3)
    one = run_level(x, q, scales, bias, level, num_threads=1)
    assert torch.equal(run_level(x, q, scales, bias, level, num_threads=2), one)
    assert torch.equal(run_level(x, q, scales, bias, level, num_threads=3), one)


def test_an_lm_head_shaped_product_agrees_across_levels():
    x, q, scales, bias = random_problem(1, 576, 4099, seed=7)
    expected = rounded_formula(x, q, scales, bias)
    for level in supported_levels():
        assert torch.equal(run_level(x, q, scales, bias, level, num_threads=2), expected)


def test_quantized_rows_round_trip_within_half_a_step():
    weight = torch.randn(70, 133, generator=torch.Generator().manual_seed(1)) * torch.logspace(-3, 3, 70)[:, None]
    q, scales = ops.int8_quantize_rows(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert torch.equal(scales, weight.abs().amax(1) / 127)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    step = scales.double()[:, None]
    error = (weight.double() - q.double() * step).abs()
    assert torch.all(error <= step * (0.5 + 128 * UNIT_ROUNDOFF))
    assert torch.equal(q, torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8))


def test_quantize_rounds_ties_to_even_and_zero_rows_get_scale_zero():
    weight = torch.tensor([[127.0, 0.5, 1.5, 2.5, -2.5, -0.5], [0.0] * 6, [-0.0] * 6])
    q, scales = ops.int8_quantize_rows(weight)
    assert q[0].tolist() == [127, 0, 2, 2, -2, 0]
    assert scales.tolist() == [1.0, 0.0, 0.0]
    assert not q[1:].any()
    x = torch.randn(2, 6)
    bias = torch.tensor([0.0, 1.5, -2.0])
    y = ops.int8_linear(x, q, scales, bias)
    assert torch.equal(y[:, 1:], bias[1:].expand(2, 2))


def test_int8_linear_takes_leading_dimensions_and_writes_into_out():
    x, q, scales, bias = random_problem(6, 40, 23, seed=5)
    expected = run_level(x, q, scales, bias, _C.simd_default(), num_threads=torch.get_num_threads())
    batched = x.reshape(2, 3, 40)
    y = ops.int8_linear(batched, q, scales, bias)
    assert y.shape == (2, 3, 23) and torch.equal(y.reshape(6, 23), expected)
    out = torch.empty(2, 3, 23)
    assert ops.int8_linear(batched, q, scales, bias, out=out) is out
    assert torch.equal(out, y)
    assert torch.equal(ops.int8_linear(x[0], q, scales, bias), expected[0])
    strided = torch.randn(40, 6).T
    assert torch.equal(ops.int8_linear(strided, q, scales), ops.int8_linear(strided.contiguous(), q, scales))


def test_int8_linear_names_the_user_mistake():
    x, q, scales, bias = random_problem(2, 16, 8)
    with pytest.raises(TypeError, match="x must be float32, got torch.float64"):
        ops.int8_linear(x.double(), q, scales)
    with pytest.raises(TypeError, match="qweight must be an int8 torch.Tensor, got torch.float32"):
        ops.int8_linear(x, q.float(), scales)
    with pytest.raises(ValueError, match=r"x must have in_features=16 as its last dimension, got shape \(2, 15\)"):
        ops.int8_linear(x[:, :15], q, scales)
    with pytest.raises(ValueError, match=r"qweight must be a contiguous CPU tensor"):
        ops.int8_linear(x[:, :8], q.T, scales)
    with pytest.raises(ValueError, match=r"scales must have shape \(8,\), got \(7,\)"):
        ops.int8_linear(x, q, scales[:7])
    with pytest.raises(TypeError, match="scales must be float32, got torch.float16"):
        ops.int8_linear(x, q, scales.half())
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\), got \(9,\)"):
        ops.int8_linear(x, q, scales, torch.zeros(9))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 8\), got \(2, 7\)"):
        ops.int8_linear(x, q, scales, out=torch.empty(2, 7))
    with pytest.raises(ValueError, match="out must be contiguous"):
        ops.int8_linear(x, q, scales, out=torch.empty(8, 2).T)
    with pytest.raises(TypeError, match="weight must be float32, got torch.bfloat16"):
        ops.int8_quantize_rows(torch.zeros(2, 2, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="weight has a non-finite value at row 1, column 2"):
        ops.int8_quantize_rows(torch.tensor([[1.0, 2, 3], [4, 5, float("nan")]]))


def test_c_entry_points_check_every_argument():
    x, q, scales, bias = (t.numpy() for t in random_problem(2, 16, 8))
    out = np.empty((2, 8), np.float32)
    with pytest.raises(TypeError, match="weight must have dtype int8"):
        _C.int8_matmul(x, q.astype(np.int16), scales, bias, out)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        _C.int8_matmul(x, q.reshape(-1), scales, bias, out)
    with pytest.raises(ValueError, match="weight must be C-contiguous"):
        _C.int8_matmul(x[:, :8], q.T, scales, bias, out)
    with pytest.raises(ValueError, match=r"weight must have shape \(out_features, 15\)"):
        _C.int8_matmul(x[:, :15].copy(), q, scales, bias, out)
    with pytest.raises(TypeError, match="x must have dtype float32"):
        _C.int8_matmul(x.astype(np.float64), q, scales, bias, out)
    with pytest.raises(ValueError, match=r"scales must have shape \(8,\)"):
        _C.int8_matmul(x, q, scales[:7], bias, out)
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        _C.int8_matmul(x, q, scales, bias[:7], out)
    with pytest.raises(ValueError, match=r"out must have shape \(2, 8\)"):
        _C.int8_matmul(x, q, scales, bias, out[:1])
    with pytest.raises(TypeError, match="out must have dtype float32"):
        _C.int8_matmul(x, q, scales, bias, out.astype(np.float64))
    with pytest.raises(ValueError, match="out must be C-contiguous and writeable"):
        _C.int8_matmul(x, q, scales, bias, np.empty((8, 2), np.float32).T)
    shared = np.zeros(2 * 16 + 2 * 8, np.float32)
    with pytest.raises(ValueError, match="out must not overlap x"):
        _C.int8_matmul(shared[:32].reshape(2, 16), q, scales, bias, shared[24:40].reshape(2, 8))
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        _C.int8_matmul(x, q, scales, bias, out, num_threads=0)
    with pytest.raises(ValueError, match="unknown SIMD level 'sse'"):
        _C.int8_matmul(x, q, scales, bias, out, simd="sse")
    weight = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"q must have the weight's shape \(3, 4\)"):
        _C.int8_quantize_rows(weight, np.empty((3, 5), np.int8), np.empty(3, np.float32))
    with pytest.raises(TypeError, match="q must have dtype"):
        _C.int8_quantize_rows(weight, np.empty((3, 4), np.uint8), np.empty(3, np.float32))
    with pytest.raises(ValueError, match=r"scales must have shape \(3,\)"):
        _C.int8_quantize_rows(weight, np.empty((3, 4), np.int8), np.empty(4, np.float32))


RAW_C_API_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np

    class Error(ctypes.Structure):
        _fields_ = [("message", ctypes.c_char * 512)]

    core = ctypes.CDLL(sys.argv[1])
    pointer = lambda array: array.ctypes.data_as(ctypes.c_void_p)
    i64 = ctypes.c_int64
    x, y = np.ones((2, 8), np.float32), np.zeros((2, 4), np.float32)
    w, scales = np.ones((4, 8), np.int8), np.ones(4, np.float32)
    calls = {
        "null weight": (i64(2), i64(8), i64(4), pointer(x), None, pointer(scales), None, pointer(y), 0, 1),
        "null y": (i64(2), i64(8), i64(4), pointer(x), pointer(w), pointer(scales), None, None, 0, 1),
        "zero in": (i64(2), i64(0), i64(4), pointer(x), pointer(w), pointer(scales), None, pointer(y), 0, 1),
        "bad simd": (i64(2), i64(8), i64(4), pointer(x), pointer(w), pointer(scales), None, pointer(y), 9, 1),
        "overflow": (i64(2), i64(2**62), i64(4), pointer(x), pointer(w), pointer(scales), None, pointer(y), 0, 1),
    }
    for name, args in calls.items():
        error = Error()
        print(name, core.aqlm_int8_matmul(*args, ctypes.byref(error)), error.message.decode())
    error = Error()
    status = core.aqlm_int8_quantize_rows(i64(4), i64(8), None, pointer(w), pointer(scales), 1, ctypes.byref(error))
    print("quantize null weight", status, error.message.decode())
    """
)


def test_raw_c_api_rejects_null_pointers_and_bad_sizes_with_a_status():
    """A child process makes the calls, so a crash fails this test instead of the test run."""
    child = subprocess.run([sys.executable, "-c", RAW_C_API_SCRIPT, _C.__file__], capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    lines = child.stdout.splitlines()
    assert lines == [
        "null weight 1 weight and scales must not be NULL",
        "null y 1 x and y must not be NULL",
        "zero in 1 in_features and out_features must be >= 1, got in=0, out=4",
        "bad simd 1 unknown SIMD level 9",
        f"overflow 1 sizes too large: n=2, in={2**62}, out=4 overflow an index",
        "quantize null weight 1 weight, q and scales must not be NULL",
    ]
