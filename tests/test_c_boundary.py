"""The C core's boundary: NULL pointers through the raw C API, aliased buffers and scale shapes
through the Python bindings and the torch ops."""
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import aqlm.ops
from aqlm import QuantizedLinear, _C
from aqlm.format import dequantize_reference, pack_codes

NULL_CODES_SCRIPT = textwrap.dedent(
    """
    import ctypes, sys
    import numpy as np

    class Format(ctypes.Structure):
        _fields_ = [(name, ctypes.c_int64) for name in
                    ("out_features", "in_features", "out_group_size", "in_group_size", "num_codebooks")]
        _fields_ += [("nbits", ctypes.c_int), ("code_bits", ctypes.c_int)]

    class Error(ctypes.Structure):
        _fields_ = [("message", ctypes.c_char * 512)]

    core = ctypes.CDLL(sys.argv[1])
    pointer = lambda array: array.ctypes.data_as(ctypes.c_void_p)
    # 4-bit codes stored as int8: the range check reads every code, so NULL must be caught first.
    fmt = ctypes.byref(Format(4, 8, 1, 8, 1, 4, 8))
    codebooks, scales = np.zeros((1, 16, 1, 8), np.float32), np.ones(4, np.float32)
    x, y, weight = np.ones((2, 8), np.float32), np.zeros((2, 4), np.float32), np.zeros((4, 8), np.float32)
    for name in ("aqlm_lut_matmul", "aqlm_codebook_matmul"):
        error = Error()
        status = getattr(core, name)(fmt, ctypes.c_int64(2), 0, pointer(x), None, 0, pointer(codebooks),
                                     pointer(scales), None, pointer(y), 0, 1, ctypes.byref(error))
        print(name, status, error.message.decode())
    error = Error()
    status = core.aqlm_dequantize(fmt, None, 0, pointer(codebooks), pointer(scales), 0, pointer(weight), 0, 1,
                                  ctypes.byref(error))
    print("aqlm_dequantize", status, error.message.decode())
    """
)


def test_matmul_and_dequantize_check_null_codes_before_reading_them() -> None:
    """Regression: aqlm_check_matmul_args range-checked int8-stored 4-bit codes before its NULL
    check. A child process runs the calls, so a crash fails this test instead of the test run."""
    child = subprocess.run([sys.executable, "-c", NULL_CODES_SCRIPT, _C.__file__], capture_output=True, text=True)
    assert child.returncode == 0, f"child died with {child.returncode}: {child.stderr}"
    lines = child.stdout.strip().splitlines()
    assert [line.split(" ", 2)[:2] for line in lines] == [
        ["aqlm_lut_matmul", "1"], ["aqlm_codebook_matmul", "1"], ["aqlm_dequantize", "1"]
    ]
    assert all(line.endswith("codes, codebooks and scales must not be NULL") for line in lines)


def _layer(out: int = 16, inp: int = 32, nbits: int = 8):
    generator = torch.Generator().manual_seed(0)
    codes = pack_codes(torch.randint(0, 2**nbits, (out, inp // 8, 2), generator=generator), nbits)
    codebooks = torch.randn(2, 2**nbits, 1, 8, generator=generator)
    scales = torch.rand(out, generator=generator) + 0.5
    return codes, codebooks, scales


@pytest.mark.parametrize("kernel", ["codebook_matmul", "lut_matmul"])
def test_output_aliasing_an_input_is_rejected(kernel: str) -> None:
    codes, codebooks, scales = _layer(out=32, inp=32)
    x = torch.randn(4, 32)
    args = [x.numpy(), codes.numpy(), codebooks.numpy(), scales.numpy(), None]
    with pytest.raises(ValueError, match="out must not overlap x"):
        getattr(_C, kernel)(*args, x.numpy())
    with pytest.raises(ValueError, match="out must not overlap x"):
        getattr(_C, kernel)(*args, x.numpy()[:, :].reshape(4, 32))
    buffer = np.random.default_rng(0).standard_normal(16 + 4 * 32).astype(np.float32)
    with pytest.raises(ValueError, match="out must not overlap bias"):
        getattr(_C, kernel)(x.numpy(), codes.numpy(), codebooks.numpy(), scales.numpy(), buffer[:32],
                            buffer[16:].reshape(4, 32))
    out = torch.empty(4, 32)
    getattr(_C, kernel)(*args, out.numpy())
    torch.testing.assert_close(out, x @ dequantize_reference(codes, codebooks, scales).T, rtol=1e-5, atol=1e-4)


def test_dequantize_output_aliasing_codebooks_is_rejected() -> None:
    codes, codebooks, scales = _layer(out=16, inp=32)
    flat = codebooks.reshape(-1)[: 16 * 32].reshape(16, 32).numpy()
    with pytest.raises(ValueError, match="out must not overlap codebooks"):
        _C.dequantize(codes.numpy(), codebooks.numpy(), scales.numpy(), flat)


@pytest.mark.parametrize("tokens", [1, 2, 100, 600])
@pytest.mark.parametrize("shape", [(16,), (1, 16), (16, 1), (16, 1, 1, 1)])
def test_scales_of_any_shape_with_one_value_per_group_are_accepted_alike(tokens: int, shape: tuple, monkeypatch) -> None:
    """Every kernel choice (per-token tables, decoding, dequantize in several row chunks) accepts the same shapes."""
    monkeypatch.setattr(aqlm.ops, "DEQUANTIZE_CHUNK_BYTES", 4 * 32 * 4)  # 4 output rows per chunk
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")  # exact paths: the comparison below is to float rounding
    codes, codebooks, scales = _layer()
    x = torch.randn(tokens, 32)
    expected = x @ dequantize_reference(codes, codebooks, scales).T
    got = torch.ops.aqlm.quantized_matmul(x, codes, codebooks, scales.reshape(shape), None)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.ops.aqlm.dequantize(codes, codebooks, scales.reshape(shape)),
                               dequantize_reference(codes, codebooks, scales))


def test_scales_with_the_wrong_count_are_rejected_at_every_size() -> None:
    codes, codebooks, scales = _layer()
    for tokens in (1, 2, 100, 600):
        with pytest.raises(ValueError, match=r"one value per output group \(16\), got shape \(2, 16\)"):
            torch.ops.aqlm.quantized_matmul(torch.randn(tokens, 32), codes, codebooks, scales.repeat(2, 1), None)


def test_quantized_linear_output_is_not_a_view() -> None:
    """PEFT adds LoRA outputs in place (result += lora(x)); a view returned by a custom op forbids that."""
    codes, codebooks, scales = _layer()
    layer = QuantizedLinear.from_parts(codes, codebooks, scales)
    for shape in ((32,), (3, 32), (2, 3, 32), (2, 300, 32)):
        x = torch.randn(*shape, requires_grad=True)
        y = layer(x)
        assert not y._is_view(), f"output for input {shape} is a view"
        y += 1.0
        y.sum().backward()
        torch.testing.assert_close(x.grad, dequantize_reference(codes, codebooks, scales).sum(0).expand(*shape))


def test_quantized_table_output_aliasing_an_input_is_rejected() -> None:
    codes, codebooks, scales = _layer(out=32, inp=32)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(1))
    packed = aqlm.ops.packed_codes(codes, codebooks, scales).numpy()
    args = [x.numpy(), packed, codebooks.numpy(), scales.numpy(), None]
    with pytest.raises(ValueError, match="out must not overlap x"):
        _C.lutq_matmul(*args, x.numpy(), group=1)
    buffer = np.random.default_rng(0).standard_normal(16 + 4 * 32).astype(np.float32)
    with pytest.raises(ValueError, match="out must not overlap bias"):
        _C.lutq_matmul(*args[:4], buffer[:32], buffer[16:].reshape(4, 32), group=1)
    out = torch.empty(4, 32)
    _C.lutq_matmul(*args, out.numpy(), group=aqlm.ops.LUTQ_GROUP)
    assert torch.equal(out, aqlm.ops.quantized_matmul_cpu(x, codes, codebooks, scales, None, kernel="lutq"))


def test_getenv_each_reads_what_os_environ_holds(monkeypatch) -> None:
    monkeypatch.setenv("AQLM_TEST_VARIABLE", "on\u00e9")
    monkeypatch.delenv("AQLM_TEST_UNSET", raising=False)
    assert _C.getenv_each(("AQLM_TEST_VARIABLE", "AQLM_TEST_UNSET")) == ("on\u00e9", None)
    monkeypatch.delenv("AQLM_TEST_VARIABLE")
    assert _C.getenv_each(("AQLM_TEST_VARIABLE",)) == (None,)
    assert _C.getenv_each(()) == ()
    with pytest.raises(TypeError, match="names must be a tuple of str, got list"):
        _C.getenv_each(["AQLM_TEST_VARIABLE"])
    with pytest.raises(TypeError, match=r"names\[1\] must be a str, got int"):
        _C.getenv_each(("AQLM_TEST_VARIABLE", 1))


def _bound_arguments(kernel: str, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor):
    """The weight arguments and options of `kernel` as both its unbound function and bind_matmul take them."""
    weights = aqlm.ops.packed_codes(codes, codebooks, scales).numpy() if kernel in ("lutq", "lutw") else codes.numpy()
    options = {"group": aqlm.ops.LUTQ_GROUP} if kernel == "lutq" else {}
    return [weights, codebooks.numpy(), scales.numpy(), None], options


UNBOUND = {"lutq": "lutq_matmul", "lutw": "lutw_matmul", "lut": "lut_matmul", "decode": "codebook_matmul",
           "bf16": "bf16_matmul"}


@pytest.mark.parametrize("kernel", list(UNBOUND))
@pytest.mark.parametrize("tokens", [1, 3])
def test_a_bound_call_gives_the_bits_of_its_unbound_function(kernel: str, tokens: int) -> None:
    """bind_matmul checks once and run_bound_matmul runs the same kernel: identical bits, and the
    bound call keeps its weight arrays alive after the caller drops them."""
    codes, codebooks, scales = _layer(out=64, inp=64)
    x = torch.randn(tokens, 64, generator=torch.Generator().manual_seed(2))
    weight_args, options = _bound_arguments(kernel, codes, codebooks, scales)
    expected = torch.empty(tokens, 64)
    getattr(_C, UNBOUND[kernel])(x.numpy(), *weight_args, expected.numpy(), **options)
    bound = _C.bind_matmul(kernel, np.empty((tokens, 64), np.float32), *weight_args,
                           np.empty((tokens, 64), np.float32), **options)
    del weight_args, codes, codebooks, scales
    got = torch.full((tokens, 64), float("nan"))
    _C.run_bound_matmul(bound, x.data_ptr(), got.data_ptr())
    assert torch.equal(got, expected)


def test_a_bound_lutq_call_run_from_several_threads_at_once_keeps_each_result_apart() -> None:
    """A bound 'lutq' call keeps one work memory (csrc/module.c): a second call on it while the
    first runs (another Python thread; the GIL is released) allocates its own, so each thread's
    result is the one it would get alone."""
    codes, codebooks, scales = _layer(out=1024, inp=2048)
    weight_args, options = _bound_arguments("lutq", codes, codebooks, scales)
    bound = _C.bind_matmul("lutq", np.empty((1, 2048), np.float32), *weight_args, np.empty((1, 1024), np.float32),
                           num_threads=1, **options)
    xs = [torch.randn(1, 2048, generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    expected = []
    for x in xs:
        expected.append(torch.empty(1, 1024))
        _C.run_bound_matmul(bound, x.data_ptr(), expected[-1].data_ptr())
    mismatches = []

    def run(index: int) -> None:
        out = torch.empty(1, 1024)
        for _ in range(100):
            _C.run_bound_matmul(bound, xs[index].data_ptr(), out.data_ptr())
            if not torch.equal(out, expected[index]):
                mismatches.append(index)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches


def test_bind_matmul_checks_its_arguments_as_the_unbound_functions_do() -> None:
    codes, codebooks, scales = _layer(out=32, inp=32)
    weight_args, options = _bound_arguments("lutq", codes, codebooks, scales)
    x, out = np.empty((2, 32), np.float32), np.empty((2, 32), np.float32)
    with pytest.raises(ValueError, match="kernel must be 'lutq', 'lutw', 'lut', 'decode', 'decodeq' or 'bf16', got 'dense'"):
        _C.bind_matmul("dense", x, codes.numpy(), codebooks.numpy(), scales.numpy(), None, out)
    wide_codes = torch.zeros(32, 4, 1, dtype=torch.int16).numpy()
    wide_codebooks = np.zeros((1, 512, 1, 8), np.float32)
    with pytest.raises(ValueError, match=r"kernel 'decodeq' needs prepared= \(from decodeq_prepare\)"):
        _C.bind_matmul("decodeq", x, wide_codes, wide_codebooks, scales.numpy(), None, out)
    with pytest.raises(ValueError, match="prepared must be a C-contiguous 1-D int8 array"):
        _C.bind_matmul("decodeq", x, wide_codes, wide_codebooks, scales.numpy(), None, out,
                       prepared=np.zeros(5, np.int8))
    with pytest.raises(ValueError, match=r"out must have shape \(2, 32\)"):
        _C.bind_matmul("lutq", x, *weight_args, np.empty((3, 32), np.float32), **options)
    with pytest.raises(ValueError, match="x has 16 features"):
        _C.bind_matmul("decode", np.empty((2, 16), np.float32), codes.numpy(), codebooks.numpy(), scales.numpy(),
                       None, out)
    with pytest.raises(TypeError, match="x must have dtype float16"):
        _C.bind_matmul("lut", x, codes.numpy(), codebooks.numpy(), scales.numpy(), None, out, x_dtype="float16")
    empty = _C.bind_matmul("lutq", np.empty((0, 32), np.float32), *weight_args, np.empty((0, 32), np.float32), **options)
    assert _C.run_bound_matmul(empty, 0, 0) is None  # no tokens: nothing to read or write, whatever the addresses


def test_a_bound_call_rejects_bad_addresses_and_an_out_that_overlaps_x_or_the_weight() -> None:
    codes, codebooks, scales = _layer(out=32, inp=32)
    bound = _C.bind_matmul("decode", np.empty((2, 32), np.float32), codes.numpy(), codebooks.numpy(), scales.numpy(),
                           None, np.empty((2, 32), np.float32))
    x, out = torch.randn(2, 32), torch.empty(2, 32)
    with pytest.raises(TypeError, match="takes 3 arguments"):
        _C.run_bound_matmul(bound, x.data_ptr())
    with pytest.raises(ValueError, match="PyCapsule"):
        _C.run_bound_matmul(object(), x.data_ptr(), out.data_ptr())
    with pytest.raises(TypeError, match="x_address must be an int"):
        _C.run_bound_matmul(bound, x.numpy(), out.data_ptr())
    with pytest.raises(ValueError, match="out_address must not be 0"):
        _C.run_bound_matmul(bound, x.data_ptr(), 0)
    buffer = torch.randn(200)  # x in its first 64 floats, out (64) from float 40: inside it, overlapping x
    with pytest.raises(ValueError, match="out must not overlap x"):
        _C.run_bound_matmul(bound, buffer.data_ptr(), buffer.data_ptr() + 4 * 40)
    bound_codebooks = codebooks.numpy()
    bound = _C.bind_matmul("decode", np.empty((2, 32), np.float32), codes.numpy(), bound_codebooks, scales.numpy(),
                           None, np.empty((2, 32), np.float32))
    with pytest.raises(ValueError, match="out must not overlap the weight"):
        _C.run_bound_matmul(bound, x.data_ptr(), bound_codebooks.ctypes.data + 4 * 100)
    _C.run_bound_matmul(bound, x.data_ptr(), out.data_ptr())
    torch.testing.assert_close(out, x @ dequantize_reference(codes, codebooks, scales).T, rtol=1e-5, atol=1e-4)
