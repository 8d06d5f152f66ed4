"""Torch custom ops over the C kernels: ``torch.ops.aqlm.dequantize`` and ``torch.ops.aqlm.quantized_matmul``.

CPU tensors go zero-copy to the C core (NumPy views; bfloat16 as int16 bit patterns). Weights
are viewed through their array interface, which keeps their storage resizable for FSDP2.
Every other device runs the pure-torch formula of :mod:`aqlm.format`, which gives the same
numbers. Both ops have fake implementations (``torch.compile``) and autograd formulas: gradients
flow to the input, the codebooks, the scales and the bias (codes are integers and get none).
Plain wrappers (no autograd) serve the weight-only int8 LM head (``int8_quantize_rows``,
``int8_linear``) and the quantizer's k-means and beam search.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import warnings
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import _C, arena, kernel_choice
from .format import check_code_range, dequantize_reference, nbits_of, unpack_codes

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

# Beyond those, the weight is dequantized in row chunks of at most this many bytes: a chunk stays
# in the last-level cache until BLAS consumes it, and allocations this small are reused by malloc
# instead of being mapped (and page-faulted) afresh on every call, as a whole 7B-layer weight would be.
DEQUANTIZE_CHUNK_BYTES = 8 << 20


logger = logging.getLogger("aqlm")

# Quantized lookup tables: 16-bit entries (a high-byte and a low-byte int8 table) with one fp32
# step per LUTQ_GROUP input groups and codebook, set by a bound on the entries from x and the
# codebooks, and entries from int16 inputs and codebooks by exact integer products; lutq.h bounds
# the error. On the real inputs of SmolLM2 2x8g8's linears the relative output error is median
# 0.030%, max 0.13% at 64 groups per step (entries from fp32 products rounded once, before:
# median 0.020%, max 0.10%; steps from the exact maxima, before that: median 0.017%) (benchmarks/
# lut_accuracy.py; one int8 table with a step per group, the earlier format: median 0.87%, max 3.2%;
# AQLM's own error there: ~1.8%). At 4096x4096, 64 groups per step ran as fast as 256 and faster
# than 1 or 16. They are the default for few tokens; AQLM_QUANTIZED_LUT=0 keeps every path exact.
# Dequantizing to bfloat16 for many tokens (dense bf16 matmul on CPUs with AVX512-BF16 or AMX)
# rounds the weights to 8 bits of mantissa and is opt-in: AQLM_BF16_DEQUANTIZE=1. So is the
# bfloat16 tile kernel ("bf16", csrc/bf16tile.h) for float32/float16 activations, except where the
# int8 codebooks already round by default (rounds_few_token_codebooks: codebooks of more than 256
# codewords, up to FEW_TOKENS tokens); for bfloat16 activations, already rounded so, it is a
# candidate by default.
LUTQ_GROUP = 64
# Fixed rules only (measured choices consider "lutq" up to FEW_TOKENS): the token counts up to which
# the quantized tables beat the exact paths, for codebooks of <= 16 codewords (one in-register
# shuffle on AVX2 and AVX-512) and of more (AVX-512 VBMI, and AVX2 since its 256-entry tables
# pick 16-entry slices by a tree of blends: 2x8g8, 2 threads, ms lutq / lut through the layer,
# 4096x4096 1 token 0.845 / 1.836, 2 tokens 1.86 / 3.18, 4 tokens 4.80 / 4.63; 1536x576 1 token
# 0.107 / 0.142; 576x576 2 tokens 0.084 / 0.117).
LUTQ_MAX_TOKENS = 16
LUTQ_MAX_TOKENS_WIDE = 2
FEW_TOKENS = 64  # beyond this only the dequantize paths are candidates
LUTW_MIN_TOKENS = 2  # exact wide-token tables ("lutw"): from this many tokens up to FEW_TOKENS
# Fixed rules only: "lutw" (exact) from 8 tokens for codebooks of <= 16 codewords and from 12 for
# larger ones, up to 32. A pass costs the same for 9 tokens as for 16 (its entries hold 16), and
# 8 (a pass of 8-token entries) as for 2, while the other kernels grow with the tokens. Measured
# forced side by side (benchmarks/bench_few_tokens.py, 1 thread, AVX-512, 4096x4096 and 576x576,
# ms): 2x8g8 at 8 tokens lutw 6.3 / 0.154, lutq 6.4 / 0.180, decode 6.5 / 0.114; at 16 lutw
# 7.5 / 0.190, lutq 11.5 / 0.346, decode 13.2 / 0.221; at 32 lutw 12.5 / 0.342, decode 26.8 /
# 0.441. 4x4g8 at 8 lutw 6.4 / 0.116, lutq 6.2 / 0.128; at 16 lutw 8.0 / 0.145, lutq 10.9 / 0.253.
LUTW_MIN_TOKENS_NARROW = 8
LUTW_MIN_TOKENS_WIDE = 12
LUTW_MAX_TOKENS = 32
QUANTIZED_LUT_ENV = "AQLM_QUANTIZED_LUT"
BF16_DEQUANTIZE_ENV = "AQLM_BF16_DEQUANTIZE"
AMX_ENV = "AQLM_AMX"  # "0": the bfloat16 tiles run on AVX-512 BF16 instead of AMX (read by the C core)
CPU_KERNELS = ("lutq", "lutw", "lut", "decodeq", "decode", "bf16", "dequantize", "dequantize_bf16")
FEW_TOKEN_KERNELS = ("lutq", "lutw", "lut", "decodeq", "decode", "bf16")  # C kernels over the codes; the others dequantize and call torch
# Bfloat16 tiles ("bf16": AMX, else AVX-512 BF16; _C.bf16_kernel() says which): candidates from
# this many tokens. With AMX their cost barely grows with the tokens up to 16 (4096x4096 1x16g8,
# 2 threads: 1.7 ms at 4 tokens and at 16), where the codeword lookups that build the tiles
# dominate; "decode" wins below a few tokens. Against dequantizing (bfloat16 activations,
# 1x16g8, 2 threads, ms, bf16 / dequantize): 4096x4096 at 128 tokens 4.7 / 9.7, 512 tokens 15.0 /
# 17.5, 1024 tokens 27.5 / 24.5; 11008x4096 and 4096x11008 at 512 tokens 33.0 / 43.0 and 31.4 /
# 50.8. Without AMX (VDPBF16PS on 16 tokens at a time) the rules follow the CPUs that have it
# and no AMX, AMD Zen 4 and later: on a 2-core AMD EPYC it beats "decode" from 8 tokens (4096x4096
# 1x16g8, ms, bf16 / decode: 8 tokens 4.3 / 5.7, 12: 2.7 / 5.4; 11008x4096 at 8: 6.9 / 9.9) and
# dequantizing up to 96 (4096x4096: 64 tokens 10.8 / 13.2, 96: 14.2 / 15.8, 128: 18.6 / 15.8;
# 11008x4096 at 96: 36.0 / 37.0). On an AMX CPU with AQLM_AMX=0 the range was 9 to 32 (64: 14.2 /
# 9.6 against dequantizing). The fixed rules take "bf16" within BF16_TILE_TOKENS for its kernel;
# measured choices consider it for any count.
BF16_TILE_MIN_TOKENS = 4
BF16_TILE_TOKENS = {"amx": (4, 512), "avx512bf16": (8, 96)}  # (first, last) token counts, fixed rules
# Fixed rules: up to this many tokens (one pass of its kernel) "decodeq" goes before "bf16" where
# both serve. 4096x4096 1x16g8, float32 activations and float16 codebooks, 2 threads, AMX, ms
# decodeq / bf16 (benchmarks/bench_few_tokens.py): 4 tokens 2.00 / 2.95, 8: 3.22 / 3.03, 16: 6.40
# / 3.04, 32: 12.3 / 3.38 (dense bfloat16 2.1-2.8).
DECODEQ_FIRST_TOKENS = 8
# Decoding from int8 codebooks ("decodeq", csrc/decodeq.h: codebooks of 512 to 65536 codewords,
# out_group_size 1, in_group_size 8) is, like the quantized tables, on by default and off under
# AQLM_QUANTIZED_LUT=0. Its 8-byte codewords keep a 2**16-entry codebook (512 KiB) in L2, where
# "decode" reads 16-byte float16 (or 32-byte float32) ones from a codebook that misses it. Its
# relative output error is about 1.1% on a codebook of normal values (each codebook's int8 step is
# its largest |value| / 127) and median 0.77%, max 2.1% on SmolLM2's linears in 2x16g8 with its
# own weight groups as codewords, whose token-by-token perplexity it moved by +0.225%
# (benchmarks/lut_accuracy.py; README).
# It is a candidate wherever "decode" is, and the fixed rules take it in place of "decode": it was
# faster at every token count tried at 4096x4096 (1x16g8, float16 codebooks, 2 threads, ms
# decodeq / decode, bound calls interleaved with dense products, benchmarks/bench_few_tokens.py:
# 1 token 1.27 / 1.96, 2: 1.43 / 3.59, 4: 2.57 / 3.57, 8: 3.87 / 6.29, 16: 7.25 / 10.95); at
# 576x576, where the 512 KiB codebook outweighs the layer, the two are within noise of each other
# and the measured choice decides.
_CHOOSER = kernel_choice.KernelChooser()


def simd_supported() -> str:
    """The best SIMD level this CPU, its OS and this build support: "scalar", "avx2" or "avx512"."""
    return _C.simd_supported()


def lutq_kernel_name() -> str:
    """The quantized-table kernels this process runs (its SIMD level, AQLM_SIMD included):
    "avx512vbmi", "avx2" or "scalar"."""
    return _C.lutq_kernel()


def exact_lut_requested() -> bool:
    """Whether the quantized tables and int8 codebooks are turned off (``AQLM_QUANTIZED_LUT=0``):
    exact fp32 tables and exact decoding only."""
    return os.environ.get(QUANTIZED_LUT_ENV, "1") == "0"


def bf16_dequantize_requested() -> bool:
    """Whether many-token calls may dequantize to bfloat16 (``AQLM_BF16_DEQUANTIZE=1``; off by default)."""
    return os.environ.get(BF16_DEQUANTIZE_ENV, "0") not in ("", "0")


def lutq_applies(nbits: int, out_group_size: int) -> bool:
    """Whether the quantized-table kernel serves this format (codebooks of <= 256 codewords, og 1)."""
    return nbits <= 8 and out_group_size == 1


def decodeq_applies(nbits: int, out_group_size: int, in_group_size: int) -> bool:
    """Whether int8-codebook decoding ("decodeq") serves this format: codebooks of 512 to 65536
    codewords (int16 codes), out_group_size 1 and in_group_size 8."""
    return nbits > 8 and out_group_size == 1 and in_group_size == 8


def rounds_few_token_codebooks(tokens: int, nbits: int, out_group_size: int, in_group_size: int, exact: bool) -> bool:
    """Whether this call may round codebooks of more than 256 codewords by default: where the
    int8 codebooks ("decodeq") are candidates (unless ``exact``, up to FEW_TOKENS tokens), the
    bfloat16 tiles ("bf16") are too, for any activations. They round codewords and activations to
    bfloat16, each value within 2**-9 of itself, where "decodeq" rounds a codeword value within
    1/254 of its codebook's largest and an activation within 1/65534 of its token's largest."""
    return not exact and tokens <= FEW_TOKENS and decodeq_applies(nbits, out_group_size, in_group_size)


def lutw_applies(tokens: int, nbits: int, out_group_size: int) -> bool:
    """Whether the exact wide-token tables ("lutw") serve this call: the packed codes of
    :func:`packed_codes` (codebooks of <= 256 codewords, og 1) and at least LUTW_MIN_TOKENS tokens
    (at one token its 16-token entries carry 15 zeros)."""
    return LUTW_MIN_TOKENS <= tokens and lutq_applies(nbits, out_group_size)


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16), per /proc/cpuinfo."""
    flags = (kernel_choice.cpuinfo_field("flags") or "").split()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_tiles_apply(
    tokens: int, out_group_size: int, in_group_size: int, in_features: int, input_dtype: torch.dtype, bf16: bool
) -> bool:
    """Whether the bfloat16 tile kernel ("bf16") serves this call: this CPU runs it with AMX or
    AVX-512 BF16 (``_C.bf16_kernel()``), the format suits its tiles (out_group_size 1,
    in_group_size even and dividing 32, in_features divisible by 32), at least
    BF16_TILE_MIN_TOKENS tokens, and rounding to bfloat16 is acceptable: the activations are
    bfloat16 already, or ``bf16`` (AQLM_BF16_DEQUANTIZE=1, or :func:`rounds_few_token_codebooks`)."""
    return (
        tokens >= BF16_TILE_MIN_TOKENS and out_group_size == 1 and in_group_size % 2 == 0
        and 32 % in_group_size == 0 and in_features % 32 == 0
        and (input_dtype == torch.bfloat16 or bf16) and _C.bf16_kernel() != "scalar"
    )


def applicable_cpu_kernels(
    tokens: int, nbits: int, out_group_size: int, input_dtype: torch.dtype, exact: bool, bf16: bool = False,
    in_group_size: int = 8, in_features: int = 0,
) -> list:
    """The CPU kernels worth measuring for this many tokens, cheapest to try first (``exact``: no
    quantized tables; ``bf16``: rounding to bfloat16 allowed for any activations)."""
    kernels = []
    if tokens <= FEW_TOKENS:
        if not exact and lutq_applies(nbits, out_group_size):
            kernels.append("lutq")
        if lutw_applies(tokens, nbits, out_group_size):
            kernels.append("lutw")
        if nbits <= 8:
            kernels.append("lut")
        if not exact and decodeq_applies(nbits, out_group_size, in_group_size):
            kernels.append("decodeq")
        kernels.append("decode")
    if bf16_tiles_apply(tokens, out_group_size, in_group_size, in_features, input_dtype,
                        bf16 or rounds_few_token_codebooks(tokens, nbits, out_group_size, in_group_size, exact)):
        kernels.append("bf16")
    kernels.append("dequantize")
    if bf16 and input_dtype != torch.bfloat16 and cpu_has_fast_bf16():
        kernels.append("dequantize_bf16")
    return kernels


def choose_cpu_kernel(
    tokens: int, num_codebooks: int, nbits: int, out_group_size: int, in_group_size: int, exact: bool = False,
    bf16_tiles: bool = False,
) -> str:
    """"lutw", "lutq", "lut", "decodeq", "decode", "bf16" or "dequantize": the fixed rules, used when measured
    choices (:mod:`aqlm.kernel_choice`) are turned off with ``AQLM_KERNEL_CALIBRATION=0``.

    Int8 codebooks ("decodeq", unless ``exact``) take the place of "decode" wherever they apply
    (:func:`decodeq_applies`).

    Bfloat16 tiles ("bf16", where ``bf16_tiles``: :func:`bf16_tiles_apply`) serve codebooks of more
    than 256 codewords within BF16_TILE_TOKENS, after DECODEQ_FIRST_TOKENS where "decodeq" serves:
    4096x4096 1x16g8 at 16 tokens, 2 threads, 1.6 ms with AMX against 6.1 for "decode" (and 1.5
    for dense bfloat16); with 256 codewords or fewer the exact kernels below are about as fast up to
    16 tokens.

    Exact tables 16 tokens wide ("lutw") beat the others, exact or not, from 8 tokens for
    codebooks of <= 16 codewords and from 12 for larger ones, up to 32 at least (LUTW_* above).

    Quantized tables ("lutq", unless ``exact``) beat every exact path up to 16 tokens for
    codebooks of <= 16 codewords (4x4g8 at 4096x4096), and up to 2 tokens for larger ones where
    the CPU has AVX-512 VBMI or AVX2 (2x8g8 at 4096x4096 and at SmolLM2's 576/1536 shapes; 1-2
    threads, benchmarks/bench_matmul.py). The exact crossovers were measured on a 2-core Zen 3 at
    4096x4096 (benchmarks/bench_matmul.py): per-token lookup tables win for one 8-bit codebook up
    to 64 tokens, and for a single token generally; decoding codewords (fast for
    groups of 8 with 2**8 or 2**16 codewords) wins for a few to ~32 tokens, more so the more
    codebooks there are; beyond that, dequantize in cache-sized chunks and use BLAS.
    """
    if lutw_applies(tokens, nbits, out_group_size) and tokens <= LUTW_MAX_TOKENS:
        if tokens >= (LUTW_MIN_TOKENS_NARROW if nbits <= 4 else LUTW_MIN_TOKENS_WIDE):
            return "lutw"
    if not exact and lutq_applies(nbits, out_group_size):
        if tokens <= LUTQ_MAX_TOKENS and nbits <= 4:
            return "lutq"
        if tokens <= LUTQ_MAX_TOKENS_WIDE and _C.lutq_kernel() in ("avx512vbmi", "avx2"):
            return "lutq"
    fast_decode = out_group_size == 1 and in_group_size == 8 and nbits in (8, 16)
    decodeq = not exact and decodeq_applies(nbits, out_group_size, in_group_size)
    if bf16_tiles and nbits > 8 and not (decodeq and tokens <= DECODEQ_FIRST_TOKENS):
        first, last = BF16_TILE_TOKENS.get(_C.bf16_kernel(), (0, -1))
        if first <= tokens <= last:
            return "bf16"
    if nbits <= 8:
        if tokens == 1 or (num_codebooks == 1 and tokens <= 64) or (num_codebooks == 2 and tokens < 4):
            return "lut"
        if fast_decode and tokens <= 32:
            return "decode"
        return "lut" if tokens * num_codebooks <= 64 else "dequantize"
    limit = 24 if fast_decode else 4
    if tokens * num_codebooks > limit:
        return "dequantize"
    return "decodeq" if decodeq else "decode"


def _numpy_view(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a contiguous CPU tensor (bfloat16 as int16 bit patterns)."""
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy()


def check_weight(
    codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor] = None
) -> int:
    """Check the weight tensors against each other; return ``nbits``. Raises TypeError/ValueError."""
    for name, tensor in (("codes", codes), ("codebooks", codebooks), ("scales", scales), ("bias", bias)):
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    nbits = nbits_of(codebooks)
    if codebooks.dtype not in _DTYPE_NAMES:
        raise TypeError(f"codebooks must be float32, float16 or bfloat16, got {codebooks.dtype}")
    expected_codes = torch.int8 if nbits <= 8 else torch.int16
    if codes.dtype != expected_codes:
        raise TypeError(f"codes for {2**nbits}-entry codebooks must be {expected_codes}, got {codes.dtype}")
    if codes.dim() != 3:
        raise ValueError(
            "codes must have 3 dimensions [num_out_groups, num_in_groups, num_codebooks], "
            f"got shape {tuple(codes.shape)}"
        )
    if codes.shape[2] != codebooks.shape[0]:
        raise ValueError(
            f"codes have {codes.shape[2]} codebooks (shape[2]) but codebooks have {codebooks.shape[0]} (shape[0])"
        )
    if scales.dtype != codebooks.dtype:
        raise TypeError(f"scales must have the codebooks' dtype {codebooks.dtype}, got {scales.dtype}")
    if scales.numel() != codes.shape[0]:
        raise ValueError(
            f"scales must have one value per output group ({codes.shape[0]}), got shape {tuple(scales.shape)}"
        )
    out_features = codes.shape[0] * codebooks.shape[2]
    if bias is not None:
        if bias.dtype != codebooks.dtype:
            raise TypeError(f"bias must have the codebooks' dtype {codebooks.dtype}, got {bias.dtype}")
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    devices = {t.device for t in (codes, codebooks, scales, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"codes, codebooks, scales and bias must be on one device, got {sorted(map(str, devices))}")
    return nbits


def _check_input(input: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor) -> None:
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dtype not in _DTYPE_NAMES:
        raise TypeError(f"input must be float32, float16 or bfloat16, got {input.dtype}")
    in_features = codes.shape[1] * codebooks.shape[3]
    if input.dim() < 1 or input.shape[-1] != in_features:
        raise ValueError(f"input must have in_features={in_features} as its last dimension, got shape {tuple(input.shape)}")
    if input.device != codes.device:
        raise ValueError(f"input is on {input.device} but the weight is on {codes.device}")


def _arena_copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``array`` in huge-page memory (:func:`aqlm.arena.empty`)."""
    copy = arena.empty(array.nbytes).numpy().view(array.dtype).reshape(array.shape)
    copy[...] = array
    return copy


class _ArrayInterface:
    """The NumPy array interface of a contiguous CPU tensor, holding the tensor alive.

    ``Tensor.numpy()`` marks the tensor's storage as not resizable for as long as the process
    lives, and FSDP2 (``fully_shard``) frees an unsharded parameter after each forward by resizing
    its storage to 0: a weight once viewed by ``numpy()`` made that fail. Views made through this
    leave the storage resizable; the CPU plan's stamp (``data_ptr`` and ``_version``) notices the
    storage being freed or refilled.
    """

    __slots__ = ("__array_interface__", "tensor")

    _TYPESTR = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2", torch.float64: "<f8",
                torch.int8: "|i1", torch.uint8: "|u1", torch.int16: "<i2", torch.int32: "<i4", torch.int64: "<i8"}

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.__array_interface__ = {"data": (tensor.data_ptr(), False), "shape": tuple(tensor.shape),
                                    "typestr": self._TYPESTR[tensor.dtype], "version": 3}


def _weight_view(tensor: torch.Tensor) -> np.ndarray:
    """Zero-copy NumPy view of a weight tensor (bfloat16 as int16 bit patterns) that, unlike
    :func:`_numpy_view`, leaves its storage resizable (:class:`_ArrayInterface`)."""
    tensor = tensor.detach().contiguous()
    if tensor.numel() == 0 or tensor.dtype not in _ArrayInterface._TYPESTR:
        return _numpy_view(tensor)
    return np.asarray(_ArrayInterface(tensor))


def _weight_arrays(codes, codebooks, scales, bias):
    return (
        _weight_view(codes),
        _weight_view(codebooks),
        _weight_view(scales),
        None if bias is None else _weight_view(bias),
    )


# ---- dequantize -------------------------------------------------------------------------------


@torch.library.custom_op("aqlm::dequantize", mutates_args=())
def dequantize(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Dense weight ``[out_features, in_features]`` in the codebooks' dtype (computed in float32)."""
    nbits = check_weight(codes, codebooks, scales)
    check_code_range(codes, nbits)
    return dequantize_reference(codes, codebooks, scales).to(codebooks.dtype)


def _dequantize_cpu_as(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Dense weight in ``dtype`` straight from the C kernel (no intermediate copy in another dtype)."""
    out_features, in_features = codes.shape[0] * codebooks.shape[2], codes.shape[1] * codebooks.shape[3]
    return _dequantize_cpu_into(codes, codebooks, scales, torch.empty(out_features, in_features, dtype=dtype))


def _dequantize_cpu_into(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Writes the dense weight of these codes ([out_features, in_features], contiguous, in its own
    dtype) into ``weight`` by the C kernel, and returns it."""
    codes_np, codebooks_np, scales_np, _ = _weight_arrays(codes, codebooks, scales, None)
    _C.dequantize(
        codes_np, codebooks_np, scales_np, _numpy_view(weight),
        param_dtype=_DTYPE_NAMES[codebooks.dtype], out_dtype=_DTYPE_NAMES[weight.dtype], num_threads=torch.get_num_threads(),
    )
    return weight


@dequantize.register_kernel("cpu")
def _dequantize_cpu(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    check_weight(codes, codebooks, scales)
    return _dequantize_cpu_as(codes, codebooks, scales, codebooks.dtype)


@dequantize.register_fake
def _dequantize_fake(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    check_weight(codes, codebooks, scales)
    return codebooks.new_empty(codes.shape[0] * codebooks.shape[2], codes.shape[1] * codebooks.shape[3])


def unscaled_weight(codes: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """The dense weight with all scales 1, in float32 (sums of codewords, never rounded to the
    codebooks' dtype): multiplied by the scales, it is the dequantized weight."""
    ones = torch.ones(codes.shape[0], dtype=codebooks.dtype, device=codebooks.device)
    if codes.device.type != "cpu":
        return dequantize_reference(codes, codebooks.detach(), ones).float()
    if type(codes) is torch.Tensor and type(codebooks) is torch.Tensor:
        check_weight(codes, codebooks, ones)
        return _dequantize_cpu_as(codes.detach(), codebooks.detach(), ones, torch.float32)
    # Tensors being traced (torch.compile's fake and functional tensors in a backward formula)
    # have no data for the C core: the op records the same float32 sums in the graph.
    return torch.ops.aqlm.dequantize(codes, codebooks.detach().float(), ones.float())


def scale_rows(unscaled: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``unscaled`` [out, in] with each output group's rows multiplied by its scale (float32)."""
    groups = scales.numel()
    return (unscaled.view(groups, -1) * scales.detach().float().view(groups, 1)).view_as(unscaled)


def weight_gradients(
    grad_weight: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    need_codebooks: bool,
    need_scales: bool,
    unscaled: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of a loss with respect to codebooks and scales, given its gradient for the dense weight.

    ``unscaled`` (:func:`unscaled_weight`), when the caller already has it, saves the scales'
    gradient a dequantization.
    """
    num_codebooks, codebook_size, out_group_size, in_group_size = codebooks.shape
    num_out_groups, num_in_groups, _ = codes.shape
    rows = grad_weight.float().reshape(num_out_groups, -1)  # one row per output group: contiguous products
    grad_codebooks = grad_scales = None
    if need_scales:
        if unscaled is None:
            unscaled = unscaled_weight(codes, codebooks)
        grad_scales = (rows * unscaled.float().reshape(num_out_groups, -1)).sum(dim=1).view_as(scales).to(scales.dtype)
    if need_codebooks:
        grad_codebooks = codebook_gradient(grad_weight, codeword_rows(codes, codebook_size), scales, codebooks.shape)
        grad_codebooks = grad_codebooks.to(codebooks.dtype)
    return grad_codebooks, grad_scales


def codeword_rows(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """[num_codebooks, code groups]: the row of each code in the codebooks flattened to
    [num_codebooks * codebook_size, ...] (computed once, it serves many :func:`codebook_gradient` calls)."""
    num_codebooks = codes.shape[2]
    offsets = torch.arange(num_codebooks, device=codes.device) * codebook_size
    return (unpack_codes(codes, codebook_size.bit_length() - 1) + offsets).reshape(-1, num_codebooks).T.contiguous()


def codebook_gradient(
    grad_weight: torch.Tensor,
    rows: torch.Tensor,
    scales: torch.Tensor,
    codebooks_shape: torch.Size,
    into: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Float32 gradient with respect to codebooks of shape ``codebooks_shape`` of a loss whose dense-weight
    gradient is ``grad_weight``, for fixed codes (their :func:`codeword_rows`) and scales: each codeword
    collects scale * the blocks of ``grad_weight`` its codes cover, in the order of the code groups.

    ``into``: a float32 tensor of ``codebooks_shape`` whose sums this continues (in place), such as this
    function's result for the rows above ``grad_weight``'s: continued sums are those of the whole
    weight, bit for bit.
    """
    num_codebooks, codebook_size, out_group_size, in_group_size = codebooks_shape
    num_out_groups = scales.shape[0]
    num_in_groups = rows.shape[1] // max(num_out_groups, 1)
    scaled = grad_weight.float().reshape(num_out_groups, -1) * scales.detach().float().reshape(num_out_groups, 1)
    blocks = scaled.view(num_out_groups, out_group_size, num_in_groups, in_group_size).swapaxes(1, 2)
    blocks = blocks.reshape(num_out_groups * num_in_groups, out_group_size * in_group_size)  # a view when og == 1
    if into is None:
        into = torch.zeros(codebooks_shape, device=grad_weight.device)
    flat = into.view(num_codebooks * codebook_size, out_group_size * in_group_size)
    for m in range(num_codebooks):
        flat.index_add_(0, rows[m], blocks)
    return into


class CodewordSums:
    """:func:`codebook_gradient` for many matrices and one set of codes, as one sparse product.

    Built once from the codes (and, optionally, fixed scales): a [M * K, code groups] CSR matrix
    whose entry (row of codeword (m, k), group n) is the scale of n's output group (or 1) where
    group n is coded with k in codebook m. Each call multiplies it by the blocks of ``grad_weight``
    (each codeword's sum runs over its groups in order), about five times faster than scattering
    with ``index_add_`` on SmolLM2's shapes.
    """

    def __init__(self, codes: torch.Tensor, codebooks_shape: torch.Size, scales: Optional[torch.Tensor] = None):
        num_codebooks, codebook_size, out_group_size, in_group_size = codebooks_shape
        self.codebooks_shape = torch.Size(codebooks_shape)
        self.scaled = scales is not None
        rows = codeword_rows(codes, codebook_size).flatten()
        groups = codes.shape[0] * codes.shape[1]
        columns = torch.arange(groups, device=codes.device).repeat(num_codebooks)
        if scales is None:
            values = torch.ones(rows.numel(), device=codes.device)
        else:
            values = scales.detach().float().reshape(-1).repeat_interleave(codes.shape[1]).repeat(num_codebooks)
        order = torch.argsort(rows, stable=True)
        counts = torch.bincount(rows, minlength=num_codebooks * codebook_size)
        crow = torch.zeros(num_codebooks * codebook_size + 1, dtype=torch.int32, device=codes.device)
        crow[1:] = torch.cumsum(counts, 0)
        with warnings.catch_warnings():  # "beta" and "invariant checks disabled" notices of sparse CSR
            warnings.simplefilter("ignore", UserWarning)
            self.matrix = torch.sparse_csr_tensor(
                crow, columns[order].int(), values[order], (num_codebooks * codebook_size, groups)
            )

    def __call__(self, grad_weight: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Float32 gradient with respect to codebooks (:func:`codebook_gradient`); ``scales`` is
        required exactly when none were fixed at construction."""
        if (scales is None) != self.scaled:
            raise ValueError("pass scales to CodewordSums either when building it or when calling it, not both or neither")
        num_codebooks, codebook_size, out_group_size, in_group_size = self.codebooks_shape
        groups = self.matrix.shape[1]
        num_out_groups = grad_weight.shape[0] // out_group_size
        rows = grad_weight.float().reshape(num_out_groups, -1)
        if scales is not None:
            rows = rows * scales.detach().float().reshape(num_out_groups, 1)
        blocks = rows.view(num_out_groups, out_group_size, -1, in_group_size).swapaxes(1, 2)
        blocks = blocks.reshape(groups, out_group_size * in_group_size)  # a view when og == 1
        return (self.matrix @ blocks).view(self.codebooks_shape)


def _dequantize_setup(ctx, inputs, output) -> None:
    codes, codebooks, scales = inputs
    ctx.save_for_backward(codes, codebooks, scales)


def _dequantize_backward(ctx, grad_weight):
    codes, codebooks, scales = ctx.saved_tensors
    grad_codebooks, grad_scales = weight_gradients(
        grad_weight, codes, codebooks, scales, ctx.needs_input_grad[1], ctx.needs_input_grad[2]
    )
    return None, grad_codebooks, grad_scales


dequantize.register_autograd(_dequantize_backward, setup_context=_dequantize_setup)


# ---- quantized matmul -------------------------------------------------------------------------


def quantized_matmul_torch(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """The pure-torch path, for every device the C core does not serve: the dense weight by the
    defining formula in float32, then ``F.linear`` in the input's dtype."""
    nbits = check_weight(codes, codebooks, scales, bias)
    _check_input(input, codes, codebooks)
    check_code_range(codes, nbits)
    weight = dequantize_reference(codes, codebooks, scales).to(input.dtype)
    return F.linear(input, weight, None if bias is None else bias.to(input.dtype))


# ``aqlm::quantized_matmul`` is registered through torch.library's lower-level calls, not
# ``torch.library.custom_op``: a custom op wraps its device kernel in two more Python layers
# (a torch._disable_dynamo wrapper and an output-aliasing check), about 3-5 us a call measured
# in one process, and a torch.compile'd model calls the op once per linear (210 times a SmolLM2
# token). The kernels return fresh tensors (tests/test_c_boundary.py checks that no output is a view).
_LIBRARY = torch.library.Library("aqlm", "FRAGMENT")
torch.library.define(
    "aqlm::quantized_matmul",
    "(Tensor input, Tensor codes, Tensor codebooks, Tensor scales, Tensor? bias) -> Tensor",
    lib=_LIBRARY,
)
torch.library.impl("aqlm::quantized_matmul", "CompositeExplicitAutograd", quantized_matmul_torch, lib=_LIBRARY)


def quantized_matmul(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    """``input @ W.T + bias`` in the input's dtype, W the dequantized weight: the op
    ``torch.ops.aqlm.quantized_matmul`` (C kernels on the CPU, the pure-torch formula elsewhere)."""
    return torch.ops.aqlm.quantized_matmul.default(input, codes, codebooks, scales, bias)


def packed_codes(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The codes repacked for ``_C.lutq_matmul`` (tiles of 64 output rows side by side).

    Computed on first use and kept on the codes tensor itself, so it lives and dies with the
    weight; an in-place change of the codes (``codes.copy_``, as ``load_state_dict`` does) bumps
    ``codes._version``, and new storage (``codes.data = ...``) moves ``codes.data_ptr()``: either
    makes it be recomputed. Writes through a NumPy view bypass both and are not seen.
    """
    stamp = (codes._version, codes.data_ptr())
    cached = getattr(codes, "_aqlm_lutq_packed", None)
    if cached is not None and cached[0] == stamp:
        return cached[1]
    in_features = codes.shape[1] * codebooks.shape[3]
    size = _C.lutq_packed_size(codes.shape[0], in_features, codebooks.shape[3], codes.shape[2], nbits_of(codebooks))
    packed = arena.empty(size)  # on huge pages, beside other layers' packed codes
    codes_np, codebooks_np, scales_np, _ = _weight_arrays(codes, codebooks, scales, None)
    _C.lutq_pack_codes(codes_np, codebooks_np, scales_np, packed.numpy(), param_dtype=_DTYPE_NAMES[codebooks.dtype])
    codes._aqlm_lutq_packed = (stamp, packed)
    return packed


def lutq_prepare_codebooks(codebooks: np.ndarray, param_dtype: str = "float32") -> np.ndarray:
    """The codebooks [M, K, 1, in_group_size] (a NumPy array in ``param_dtype``; bfloat16 as its
    int16 view) prepared for ``_C.lutq_matmul``'s ``prepared`` argument: transposed to float32
    [M, in_group_size, K], then the bounds that set the table steps (csrc/lutq.h), one 1-D array."""
    return _C.lutq_prepare_codebooks(codebooks, param_dtype=param_dtype)


def decodeq_prepare_codebooks(codebooks: np.ndarray, param_dtype: str = "float32") -> np.ndarray:
    """The codebooks [M, K, 1, 8] (a NumPy array in ``param_dtype``; bfloat16 as its int16 view)
    prepared for ``_C.decodeq_matmul``: one float32 step per codebook and the codebooks rounded to
    int8 (csrc/decodeq.h), one 1-D int8 array. A NaN or infinity in them raises ValueError."""
    return _C.decodeq_prepare(codebooks, param_dtype=param_dtype)


def quantized_matmul_cpu(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    kernel: Optional[str] = None,
) -> torch.Tensor:
    """``input @ W.T + bias`` on the CPU by the named kernel (one of ``CPU_KERNELS``), or by the
    one ``choose_cpu_kernel`` picks (quantized tables unless ``AQLM_QUANTIZED_LUT=0``)."""
    nbits = check_weight(codes, codebooks, scales, bias)
    _check_input(input, codes, codebooks)
    out_features = codes.shape[0] * codebooks.shape[2]
    tokens = math.prod(input.shape[:-1])
    x = input.reshape(tokens, input.shape[-1]).contiguous()
    if kernel is None:
        kernel = _pick_cpu_kernel(x, codes, codebooks, scales, bias, nbits)
    elif kernel not in CPU_KERNELS:
        raise ValueError(f"kernel must be one of {CPU_KERNELS} or None, got {kernel!r}")
    if kernel in ("lut", "lutq", "lutw") and nbits > 8:
        raise ValueError(f"kernel={kernel!r} needs codebooks of at most 256 codewords, got {2**nbits}")
    if kernel in ("lutq", "lutw") and not lutq_applies(nbits, codebooks.shape[2]):
        raise ValueError(f"kernel={kernel!r} needs out_group_size=1, got {codebooks.shape[2]}")
    if kernel == "decodeq" and not decodeq_applies(nbits, codebooks.shape[2], codebooks.shape[3]):
        raise ValueError(
            "kernel='decodeq' needs codebooks of more than 256 codewords, out_group_size=1 and in_group_size=8, "
            f"got {2**nbits} codewords, out_group_size={codebooks.shape[2]}, in_group_size={codebooks.shape[3]}"
        )
    prepared = None
    if kernel == "decodeq":
        plan = _cpu_plan(codes, codebooks, scales, bias)
        kernel, prepared = plan.kernel_served("decodeq"), plan.decodeq_prepared
    # The result is allocated in its final shape and returned as is: a view (of a 2-D buffer) would
    # make in-place updates of the output, such as PEFT's `result += lora(x)`, fail under autograd.
    result = torch.empty(*input.shape[:-1], out_features, dtype=input.dtype)
    out = result.view(tokens, out_features)
    if kernel in FEW_TOKEN_KERNELS:
        packed = _numpy_view(packed_codes(codes, codebooks, scales)) if kernel in ("lutq", "lutw") else None
        _few_token_matmul(kernel, x, out, _weight_arrays(codes, codebooks, scales, bias), packed, codebooks.dtype,
                          prepared)
    else:
        _dequantized_matmul_cpu(x, out, codes, codebooks, scales, bias,
                                torch.bfloat16 if kernel == "dequantize_bf16" else input.dtype)
    return result


def _dequantized_matmul_cpu(x, out, codes, codebooks, scales, bias, dense_dtype: torch.dtype) -> None:
    """``out = x @ W.T + bias`` by dequantizing W in ``dense_dtype``, DEQUANTIZE_CHUNK_BYTES of rows
    at a time, each chunk then multiplied by torch. One chunk buffer serves every chunk: a fresh
    allocation per chunk page-faults its megabytes in again each time."""
    dense_x = x.to(dense_dtype)
    out_group_size, in_features = codebooks.shape[2], codes.shape[1] * codebooks.shape[3]
    row_bytes = in_features * out_group_size * dense_x.element_size()
    groups_per_chunk = min(codes.shape[0], max(1, DEQUANTIZE_CHUNK_BYTES // row_bytes))
    chunk = torch.empty(groups_per_chunk * out_group_size, in_features, dtype=dense_dtype)
    scales = scales.reshape(-1)
    for first in range(0, codes.shape[0], groups_per_chunk):
        last = min(first + groups_per_chunk, codes.shape[0])
        rows = slice(first * out_group_size, last * out_group_size)
        weight = _dequantize_cpu_into(codes[first:last], codebooks, scales[first:last], chunk[: rows.stop - rows.start])
        out[:, rows] = F.linear(dense_x, weight, None if bias is None else bias[rows].to(dense_dtype))


def _unpacked_codes_kernel(kernel: str) -> Callable:
    """The C function of "lut", "bf16" or "decode", the kernels that read the codes as stored
    (looked up at each call, so a patched ``_C`` attribute is seen)."""
    return {"lut": _C.lut_matmul, "bf16": _C.bf16_matmul}.get(kernel, _C.codebook_matmul)


def _few_token_matmul(
    kernel: str, x: torch.Tensor, out: torch.Tensor, arrays: tuple, packed: Optional[np.ndarray], param_dtype: torch.dtype,
    prepared: Optional[np.ndarray] = None,
) -> None:
    """``out = x @ W.T + bias`` by one of the C kernels that read the codes directly (FEW_TOKEN_KERNELS).

    ``arrays`` are the weight's NumPy views (:func:`_weight_arrays`); ``packed`` the codes repacked
    for "lutq" and "lutw" (:func:`packed_codes`); ``prepared`` the int8 codebooks of "decodeq"
    (:func:`decodeq_prepare_codebooks`); each unused by the others.
    """
    codes_np, codebooks_np, scales_np, bias_np = arrays
    dtypes = {"x_dtype": _DTYPE_NAMES[x.dtype], "param_dtype": _DTYPE_NAMES[param_dtype]}
    if kernel == "lutq":
        _C.lutq_matmul(_numpy_view(x), packed, codebooks_np, scales_np, bias_np, _numpy_view(out), group=LUTQ_GROUP,
                       num_threads=torch.get_num_threads(), **dtypes)
    elif kernel == "lutw":
        _C.lutw_matmul(_numpy_view(x), packed, codebooks_np, scales_np, bias_np, _numpy_view(out),
                       num_threads=torch.get_num_threads(), **dtypes)
    elif kernel == "decodeq":
        _C.decodeq_matmul(_numpy_view(x), codes_np, codebooks_np, scales_np, bias_np, _numpy_view(out),
                          prepared=prepared, num_threads=torch.get_num_threads(), **dtypes)
    else:
        c_kernel = _unpacked_codes_kernel(kernel)
        c_kernel(_numpy_view(x), codes_np, codebooks_np, scales_np, bias_np, _numpy_view(out),
                 num_threads=torch.get_num_threads(), **dtypes)


def cpu_kernel_for(
    input: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]
) -> str:
    """The CPU kernel ``quantized_matmul`` uses for these arguments (measuring it on first use)."""
    nbits = check_weight(codes, codebooks, scales, bias)
    _check_input(input, codes, codebooks)
    x = input.reshape(-1, input.shape[-1])
    return _pick_cpu_kernel(x, codes, codebooks, scales, bias, nbits)


def _pick_cpu_kernel(x, codes, codebooks, scales, bias, nbits: int, prefer: Optional[str] = None) -> str:
    """The kernel for this call: forced (AQLM_CPU_KERNEL), else ``prefer`` where it applies, else
    measured (kernel_choice) or by fixed rules."""
    tokens, in_features = x.shape
    num_codebooks, _, out_group_size, in_group_size = codebooks.shape
    exact, bf16 = exact_lut_requested(), bf16_dequantize_requested()
    candidates = applicable_cpu_kernels(tokens, nbits, out_group_size, x.dtype, exact, bf16, in_group_size, in_features)
    bf16_tiles = "bf16" in candidates
    forced = kernel_choice.forced_kernel()
    if forced is not None:
        if forced not in CPU_KERNELS:
            raise ValueError(f"{kernel_choice.FORCE_ENV} must be one of {CPU_KERNELS}, got {forced!r}")
        if forced in candidates:
            return forced
    elif prefer in candidates:
        return prefer
    if forced is not None or not kernel_choice.calibration_enabled():
        return choose_cpu_kernel(tokens, num_codebooks, nbits, out_group_size, in_group_size, exact=exact, bf16_tiles=bf16_tiles)
    out_features = codes.shape[0] * out_group_size
    calibration_tokens = kernel_choice.token_class(tokens)
    key = (
        f"{num_codebooks}x{nbits}g{in_group_size}o{out_group_size} "
        f"{kernel_choice.shape_class(out_features)}x{kernel_choice.shape_class(in_features)} t{calibration_tokens} "
        f"x:{_DTYPE_NAMES[x.dtype]} p:{_DTYPE_NAMES[codebooks.dtype]} simd:{_C.simd_default()} "
        f"threads:{torch.get_num_threads()} {'exact' if exact else 'lutq'}{' bf16' if bf16 else ''}"
        f"{' tiles:' + _C.bf16_kernel() if bf16_tiles else ''}"
    )

    sample = torch.randn(calibration_tokens, in_features, dtype=x.dtype)
    out = torch.empty(calibration_tokens, out_features, dtype=x.dtype)

    def prepare(kernel: str) -> Callable[[], None]:
        return _kernel_call(kernel, sample, out, codes, codebooks, scales, bias)

    prior = choose_cpu_kernel(tokens, num_codebooks, nbits, out_group_size, in_group_size, exact=exact, bf16_tiles=bf16_tiles)
    return _CHOOSER.choose(key, candidates, prepare, prior=prior)


class _CpuPlan:
    """What every call on one CPU weight would otherwise re-derive: checked shapes, zero-copy
    NumPy views, packed codes, and per call key (token count, dtype, environment, threads, SIMD
    level) the kernel chosen and, for the few-token C kernels, a ready call."""

    def __init__(self, stamp: tuple, codes, codebooks, scales, bias):
        nbits = check_weight(codes, codebooks, scales, bias)
        self.stamp = stamp
        self.nbits = nbits
        self.in_features = codes.shape[1] * codebooks.shape[3]
        self.out_features = codes.shape[0] * codebooks.shape[2]
        self.param_dtype = codebooks.dtype
        self.arrays = _weight_arrays(codes, codebooks, scales, bias)  # NumPy views keep their tensors alive
        self.packed = (
            _numpy_view(packed_codes(codes, codebooks, scales)) if lutq_applies(nbits, codebooks.shape[2]) else None
        )
        # The table kernels read every codebook entry and scale once per call: float32 copies spare
        # them a float16/bfloat16 conversion per element (same values, so the same bits), except
        # for codebooks too large to copy cheaply (more than 256 codewords). Decoding reads the
        # stored dtype (few_token_call).
        # These copies sit on huge pages beside the packed codes (aqlm.arena): one call reads them all.
        if nbits <= 8:
            as_float = [None if t is None else _arena_copy(_weight_view(t.float())) for t in (codebooks, scales, bias)]
            self.kernel_arrays = (self.arrays[0], *as_float)
            self.kernel_param_dtype = torch.float32
        else:
            self.kernel_arrays, self.kernel_param_dtype = self.arrays, self.param_dtype
        # The quantized-table kernel reads the codebooks transposed ([M, in_group_size, K]) and
        # the bounds that set its table steps: prepared once here rather than at every call (the
        # same values, so the same bits).
        self.prepared = None
        if self.packed is not None and nbits <= 8:
            self.prepared = _arena_copy(lutq_prepare_codebooks(self.kernel_arrays[1]))
        self.calls = {}

    @functools.cached_property
    def decodeq_prepared(self) -> Optional[np.ndarray]:
        """The int8 codebooks "decodeq" reads, rounded on first use and kept (the same values, so
        the same bits); None where "decodeq" does not apply or the codebooks hold a NaN or
        infinity, and then "decodeq" runs as "decode"."""
        _, _, out_group_size, in_group_size = self.arrays[1].shape  # the codebooks
        if not decodeq_applies(self.nbits, out_group_size, in_group_size):
            return None
        try:
            return _arena_copy(decodeq_prepare_codebooks(self.arrays[1], param_dtype=_DTYPE_NAMES[self.param_dtype]))
        except ValueError:
            return None

    @functools.cached_property
    def bf16_prepared(self) -> Optional[np.ndarray]:
        """The codebooks "bf16" reads, rounded to bfloat16 on first use and kept (the same values,
        so the same bits), for codebooks of more than 256 codewords stored in float16 or float32:
        rounding them at each call, into a fresh buffer, made a call 0-7% slower (1x16g8
        4096x4096, 16 tokens, AMX, 2.1-3.3 ms a call).
        None otherwise: bfloat16 codebooks are read in place, small ones rounded at each call."""
        if self.nbits <= 8 or self.param_dtype == torch.bfloat16:
            return None
        return _arena_copy(_C.bf16_prepare(self.arrays[1], param_dtype=_DTYPE_NAMES[self.param_dtype]))

    def kernel_served(self, kernel: str) -> str:
        """``kernel``, except "decode" for "decodeq" where this weight's int8 codebooks do not exist
        (codebooks with a NaN or infinity: exact decoding)."""
        return "decode" if kernel == "decodeq" and self.decodeq_prepared is None else kernel

    def few_token_call(self, kernel: str, x_dtype: torch.dtype, num_threads: int, tokens: int) -> Callable[[int, int], None]:
        """``call(x_address, out_address)``: ``out = x @ W.T + bias`` by one of FEW_TOKEN_KERNELS on
        C-contiguous buffers of ``tokens`` rows in ``x_dtype`` given by their data addresses (the
        caller guarantees their sizes and lifetimes), arguments checked and bound once in C."""
        arrays, param_dtype = self.kernel_arrays, self.kernel_param_dtype
        kernel = self.kernel_served(kernel)
        if kernel in ("decode", "decodeq"):
            # Decoding reads each codeword once per token and converts on the fly, so the stored
            # (float16/bfloat16) codebooks' half size wins: 8x8g8's 64 KiB float32 copy misses L1
            # where its 32 KiB float16 original does not. Same values, so the same bits.
            arrays, param_dtype = self.arrays, self.param_dtype
        codes_np, codebooks_np, scales_np, bias_np = arrays
        options = {"x_dtype": _DTYPE_NAMES[x_dtype], "param_dtype": _DTYPE_NAMES[param_dtype],
                   "num_threads": num_threads}
        weights = codes_np
        if kernel in ("lutq", "lutw"):
            weights = self.packed
        if kernel == "lutq":
            options.update(group=LUTQ_GROUP, prepared=self.prepared)
        if kernel == "decodeq":
            options.update(prepared=self.decodeq_prepared)
        if kernel == "bf16" and self.bf16_prepared is not None:
            options.update(prepared=self.bf16_prepared)
        x_template = _numpy_view(torch.empty(tokens, self.in_features, dtype=x_dtype))
        out_template = _numpy_view(torch.empty(tokens, self.out_features, dtype=x_dtype))
        bound = _C.bind_matmul(kernel, x_template, weights, codebooks_np, scales_np, bias_np, out_template, **options)
        return functools.partial(_C.run_bound_matmul, bound)


def _weight_stamp(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple:
    """Changes when any weight tensor is replaced (``id``), updated in place (``_version``) or
    given new storage (``.data = ...``)."""
    return (
        codes._version, codes.data_ptr(),
        id(codebooks), codebooks._version, codebooks.data_ptr(),
        id(scales), scales._version, scales.data_ptr(),
        None if bias is None else (id(bias), bias._version, bias.data_ptr()),
    )


def _cpu_plan(codes, codebooks, scales, bias) -> _CpuPlan:
    """The plan of this weight, kept on the codes tensor; rebuilt when any of its tensors is
    replaced or changed (:func:`_weight_stamp`)."""
    stamp = _weight_stamp(codes, codebooks, scales, bias)
    plan = getattr(codes, "_aqlm_cpu_plan", None)
    if plan is None or plan.stamp != stamp:
        plan = _CpuPlan(stamp, codes, codebooks, scales, bias)
        codes._aqlm_cpu_plan = plan
    return plan


# The environment variables a CPU call's kernel depends on, read in one C call per call.
_CALL_ENVIRONMENT = (QUANTIZED_LUT_ENV, BF16_DEQUANTIZE_ENV, kernel_choice.FORCE_ENV, kernel_choice.CALIBRATION_ENV, AMX_ENV)


def quantized_linear_cpu(
    input: torch.Tensor, codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """``quantized_matmul`` on the CPU with the per-weight work cached: the eager inference path
    of :class:`aqlm.QuantizedLinear` (called directly, without the custom-op dispatch, autograd
    or tracing) and the op's CPU kernel. Same kernels, same results."""
    plan = _cpu_plan(codes, codebooks, scales, bias)
    dtype, in_features = input.dtype, plan.in_features
    if dtype not in _DTYPE_NAMES or input.dim() < 1 or input.shape[-1] != in_features:
        return quantized_matmul_cpu(input, codes, codebooks, scales, bias)  # raises the precise error
    tokens = input.numel() // in_features
    threads = torch.get_num_threads()
    key = (tokens, dtype, _C.getenv_each(_CALL_ENVIRONMENT), threads, _C.simd_default())
    call = plan.calls.get(key)
    if call is None:
        x = input.detach().reshape(tokens, in_features).contiguous()
        kernel = _pick_cpu_kernel(x, codes, codebooks, scales, bias, plan.nbits)
        call = plan.calls[key] = plan.few_token_call(kernel, dtype, threads, tokens) if kernel in FEW_TOKEN_KERNELS else kernel
    if type(call) is str:
        return quantized_matmul_cpu(input, codes, codebooks, scales, bias, kernel=call)
    # Data addresses, not NumPy views: a few microseconds fewer per call (decoding makes hundreds per token)
    result = torch.empty(input.shape[:-1] + (plan.out_features,), dtype=dtype)  # not a view: see quantized_matmul_cpu
    source = input.contiguous()  # named: a strided input's copy must live through the call
    call(source.data_ptr(), result.data_ptr())
    return result


def bound_linear_cpu(
    x: torch.Tensor,
    out: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
    prefer: Optional[str] = None,
) -> Callable[[], None]:
    """A call with no arguments that writes ``x @ W.T + bias`` into ``out``, for a loop that reuses
    the same buffers on every step (:mod:`aqlm.decode`): the kernel is chosen now, for ``x``'s
    token count, dtype, thread count and environment, as :func:`quantized_linear_cpu` would, and
    the few-token C kernels get their arguments bound once. Same kernels, same results.

    ``prefer`` (one of ``CPU_KERNELS``) takes the place of the measured choice where it serves this
    call (:func:`applicable_cpu_kernels`: "lutq" not under ``AQLM_QUANTIZED_LUT=0``) and
    ``AQLM_CPU_KERNEL`` forces no other: for a loop whose context a kernel measured alone does not
    see, such as the decoding step's chained prefetches (:func:`chain_bound_linears`).

    ``x`` ([..., in_features]) and ``out`` ([..., out_features], same leading shape and dtype)
    must be contiguous CPU tensors that outlive the call; their contents are read and written at
    each call, never reallocated.
    """
    plan = _cpu_plan(codes, codebooks, scales, bias)
    for name, tensor in (("x", x), ("out", out)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_cpu or not tensor.is_contiguous() or tensor.requires_grad:
            raise ValueError(f"{name} must be a contiguous CPU tensor that does not require grad")
    _check_input(x, codes, codebooks)
    expected = x.shape[:-1] + (plan.out_features,)
    if out.shape != expected or out.dtype != x.dtype:
        raise ValueError(f"out must have shape {tuple(expected)} and dtype {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    if prefer is not None and prefer not in CPU_KERNELS:
        raise ValueError(f"prefer must be one of {CPU_KERNELS} or None, got {prefer!r}")
    tokens = x.numel() // plan.in_features
    x2, out2 = x.view(tokens, plan.in_features), out.view(tokens, plan.out_features)
    kernel = _pick_cpu_kernel(x2, codes, codebooks, scales, bias, plan.nbits, prefer)
    return _kernel_call(kernel, x2, out2, codes, codebooks, scales, bias)


def _kernel_call(kernel: str, x: torch.Tensor, out: torch.Tensor, codes, codebooks, scales, bias) -> Callable[[], None]:
    """A call with no arguments that writes ``x @ W.T + bias`` into ``out`` by ``kernel`` (x:
    [tokens, in], out: [tokens, out], contiguous CPU tensors of one dtype, checked by the caller):
    what :func:`bound_linear_cpu` returns, and what kernel calibration times."""
    if kernel not in FEW_TOKEN_KERNELS:
        dense_dtype = torch.bfloat16 if kernel == "dequantize_bf16" else x.dtype
        return lambda: _dequantized_matmul_cpu(x, out, codes, codebooks, scales, bias, dense_dtype)
    call = _cpu_plan(codes, codebooks, scales, bias).few_token_call(kernel, x.dtype, torch.get_num_threads(), x.shape[0])
    x_address, out_address = x.data_ptr(), out.data_ptr()

    def bound_call() -> None:
        call(x_address, out_address)

    bound_call.buffers = (x, out)  # the addresses point into these: they live as long as the call
    bound_call.bound = call.args[0]  # the C call, for chain_bound_linears
    if x.dtype == torch.float32:  # the C step of step_program (float32 activations only)
        bound_call.step = ("linear", call.args[0], _numpy_view(x), _numpy_view(out))
    return bound_call


def chain_bound_linears(calls: Sequence[Callable[[], None]]) -> None:
    """Tells each call of ``calls`` from :func:`bound_linear_cpu` (in the order a loop runs them,
    as a decoding step does at every token) which such call runs next, so that a quantized-table
    call prefetches what the next one reads first while it builds its own tables
    (``aqlm_lutq_next`` in csrc/aqlm.h). Only a hint: results do not change; other callables
    among ``calls`` (norms, attention, a dense layer) are skipped."""
    bounds = [call.bound for call in calls if hasattr(call, "bound")]
    for bound, following in zip(bounds, bounds[1:] + [None]):
        _C.bind_next(bound, following)


def _step_view(name: str, tensor: torch.Tensor) -> np.ndarray:
    """The NumPy view of a decoding-step buffer: a contiguous float32 CPU tensor, used in place."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.float32 or not tensor.is_cpu or not tensor.is_contiguous() or tensor.requires_grad:
        raise ValueError(f"{name} must be a contiguous float32 CPU tensor that does not require grad, "
                         f"got {tensor.dtype} on {tensor.device}")
    return tensor.detach().numpy()


def bound_residual_rms_norm(
    h: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor, out: torch.Tensor, eps: float
) -> Callable[[], None]:
    """A call with no arguments doing, in place on these buffers, ``h += delta`` (when ``delta``
    is given) and then ``out = weight * h / sqrt(mean(h**2) + eps)``: a Llama residual add and RMS
    norm for one token. The buffers (float32, contiguous, the same number of elements) have their
    sizes checked now and everything, overlaps included, at each call."""
    h_np, weight_np, out_np = (_step_view(name, t) for name, t in (("h", h), ("weight", weight), ("out", out)))
    delta_view = None if delta is None else _step_view("delta", delta)
    for name, array in (("weight", weight_np), ("out", out_np), ("delta", delta_view)):
        if array is not None and array.size != h_np.size:
            raise ValueError(f"{name} must have as many elements as h ({h_np.size}), got {array.size}")
    eps = float(eps)
    norm = _C.residual_rms_norm

    def call() -> None:
        norm(h_np, delta_view, weight_np, out_np, eps=eps)

    call.step = ("norm", h_np, delta_view, weight_np, out_np, eps)  # the C step of step_program
    return call


def bound_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> Callable[[], None]:
    """A call with no arguments doing ``gate = silu(gate) * up`` in place (float32, contiguous)."""
    gate_np, up_np = _step_view("gate", gate), _step_view("up", up)
    if gate_np.size != up_np.size:
        raise ValueError(f"gate and up must have the same number of elements, got {gate_np.size} and {up_np.size}")
    silu_mul = _C.silu_mul

    def call() -> None:
        silu_mul(gate_np, up_np)

    call.step = ("silu", gate_np, up_np)  # the C step of step_program
    return call


def bound_attend_one(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    out: torch.Tensor,
    scale: float,
) -> Callable[[int], None]:
    """``call(position)``: one token's attention at ``position`` over a key/value cache.

    Rotates ``q`` [heads, head_dim] and ``k`` [kv_heads, head_dim] in place by the rotary tables
    ``cos`` and ``sin`` [capacity, head_dim] (row ``position``: ``x cos + rotate_half(x) sin``,
    as Llama's ``apply_rotary_pos_emb``), stores ``k`` and ``v`` at row ``position`` of ``keys``
    and ``values`` [capacity, kv_heads, head_dim], and writes ``softmax(scale q K^T) V`` over rows
    0..position into ``out`` [heads, head_dim] (grouped-query: head h reads kv head
    ``h // (heads // kv_heads)``). All float32, contiguous, used in place. Once the cache is long,
    ``torch.get_num_threads()`` threads (read now) split the heads; the result does not depend on
    their number.
    """
    arrays = {name: _step_view(name, t) for name, t in
              (("q", q), ("k", k), ("v", v), ("cos", cos), ("sin", sin), ("keys", keys), ("values", values), ("out", out))}
    if cos.dim() != 2 or sin.shape != cos.shape or keys.dim() != 3 or values.shape != keys.shape:
        raise ValueError(f"need cos and sin [capacity, head_dim] and keys and values [capacity, kv_heads, head_dim], "
                         f"got {tuple(cos.shape)}, {tuple(sin.shape)}, {tuple(keys.shape)}, {tuple(values.shape)}")
    capacity, head_dim = cos.shape
    if keys.shape[0] != capacity or keys.shape[2] != head_dim:
        raise ValueError(f"keys must have shape [{capacity}, kv_heads, {head_dim}], got {tuple(keys.shape)}")
    kv_heads = keys.shape[1]
    heads = q.numel() // head_dim
    scores = np.empty(heads * capacity, dtype=np.float32)
    attend = _C.attend_one
    q_np, k_np, v_np, cos_np, sin_np, keys_np, values_np, out_np = arrays.values()
    scale, threads = float(scale), torch.get_num_threads()

    def call(position: int) -> None:
        attend(q_np, k_np, v_np, cos_np, sin_np, keys_np, values_np, scores, out_np, heads=heads, kv_heads=kv_heads,
               position=position, scale=scale, num_threads=threads)

    # the C step of step_program, at the position the program runs at
    call.step = ("attend", q_np, k_np, v_np, cos_np, sin_np, keys_np, values_np, scores, out_np, heads, kv_heads, scale,
                 threads)
    return call


def step_program(calls: Sequence[Callable]) -> Optional[Callable[[int], None]]:
    """``run(position)``: every call of ``calls`` in order, in one C call with the GIL released
    once, attention calls at ``position``: the same kernels on the same buffers, so the same bits
    as calling them one by one, without the Python between them. ``calls`` come from
    :func:`bound_linear_cpu` (float32 activations), :func:`bound_residual_rms_norm`,
    :func:`bound_silu_mul` and :func:`bound_attend_one`; None when any other callable is among
    them (a dense layer's torch call, say), which the caller then runs one by one.

    Consecutive quantized-table linears on the same input (a Llama layer's q, k and v
    projections; its gate and up projections) run together in one parallel region, with the
    same bits; ``run.runs`` gives, for each run in order, how many calls it takes."""
    steps = [getattr(call, "step", None) for call in calls]
    if any(step is None for step in steps):
        return None
    program, run = _C.bind_step_program(steps), _C.run_step_program

    def run_program(position: int) -> None:
        run(program, position)

    run_program.runs = _C.step_program_runs(program)
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("step program: %d calls in %d runs, %d of them joined linears", len(steps), len(run_program.runs),
                     sum(count > 1 for count in run_program.runs))
    return run_program


def _quantized_matmul_cpu(
    input: torch.Tensor,
    codes: torch.Tensor,
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor],
) -> torch.Tensor:
    # The cached per-weight plan serves the op too (torch.compile passes the layer's own
    # parameters, so the plan kept on the codes is found again): same kernels, same results.
    return quantized_linear_cpu(input, codes, codebooks, scales, bias)


torch.library.impl("aqlm::quantized_matmul", "CPU", _quantized_matmul_cpu, lib=_LIBRARY)


def _quantized_matmul_fake(input, codes, codebooks, scales, bias):
    check_weight(codes, codebooks, scales, bias)
    _check_input(input, codes, codebooks)
    return input.new_empty(*input.shape[:-1], codes.shape[0] * codebooks.shape[2])


def _matmul_setup(ctx, inputs, output) -> None:
    input, codes, codebooks, scales, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, codes, codebooks, scales)


def _matmul_backward(ctx, grad_output):
    """At most one dequantization: the unscaled weight serves both the input's and the scales' gradients."""
    input, codes, codebooks, scales = ctx.saved_tensors
    need_input, _, need_codebooks, need_scales, need_bias = ctx.needs_input_grad
    grad_input = grad_codebooks = grad_scales = grad_bias = None
    unscaled = unscaled_weight(codes, codebooks) if need_input or need_scales else None
    if need_input:
        grad_input = grad_output @ scale_rows(unscaled, scales).to(grad_output.dtype)
    if need_codebooks or need_scales:
        flat_grad = grad_output.reshape(-1, grad_output.shape[-1]).float()
        grad_weight = flat_grad.T @ input.reshape(-1, input.shape[-1]).float()
        grad_codebooks, grad_scales = weight_gradients(
            grad_weight, codes, codebooks, scales, need_codebooks, need_scales, unscaled=unscaled
        )
    if need_bias and ctx.has_bias:
        grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).to(codebooks.dtype)
    return grad_input, None, grad_codebooks, grad_scales, grad_bias


torch.library.register_fake("aqlm::quantized_matmul", _quantized_matmul_fake, lib=_LIBRARY)
torch.library.register_autograd("aqlm::quantized_matmul", _matmul_backward, setup_context=_matmul_setup, lib=_LIBRARY)


# ---- weight-only int8 rows (the LM head) -----------------------------------------------------


def int8_quantize_rows(weight: torch.Tensor, *, num_threads: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8 quantization of ``weight`` [out, in] (float32, CPU), in C.

    Returns (q [out, in] int8, scales [out] float32) with scale = max |row| / 127 and
    q = row / scale rounded to nearest even, clamped to [-127, 127]; so |weight - q * scale| <=
    scale / 2 elementwise. An all-zero row gets scale 0 and q 0. NaN/Inf raise ValueError.
    """
    _check_cpu_float32("weight", weight, 2)
    q = arena.empty(weight.numel()).view(torch.int8).view(weight.shape)  # read once per token: huge pages
    scales = torch.empty(weight.shape[0], dtype=torch.float32)
    _C.int8_quantize_rows(weight.detach().contiguous().numpy(), q.numpy(), scales.numpy(),
                          num_threads=num_threads or torch.get_num_threads())
    return q, scales


def int8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    simd: Optional[str] = None,
) -> torch.Tensor:
    """``x @ (qweight.float() * scales[:, None]).T + bias`` with the int8 weight read as is, in C.

    x [..., in] float32; qweight [out, in] int8 and scales [out] float32 (from
    :func:`int8_quantize_rows`); bias [out] float32 or None; all on the CPU. The weight is read
    once per call for few tokens (the decode case; for many tokens a dense GEMM is faster). Each
    token is rounded to int16 with one step per token (step = max |x| / 32767; each value moves by
    at most step / 2, 256 times finer than the weight's own rounding) and multiplied exactly in
    integers; the result is then ``scales * (step * float(xq @ qweight.T)) + bias``, the same bits
    on every SIMD level and thread count. A token holding NaN or an infinity gives NaN outputs.
    With ``out`` (float32, contiguous, shape
    [..., out], not overlapping the inputs) the result is written there and ``out`` is returned:
    no tensor is allocated per call. No gradients flow through this function. Uses torch's thread count,
    and the SIMD level ``simd`` ("scalar", "avx2", "avx512"; None: the default level).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if x.dim() < 1 or x.device.type != "cpu":
        raise ValueError(f"x must be a CPU tensor of shape [..., in_features], got shape {tuple(x.shape)} on {x.device}")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int8:
        raise TypeError(f"qweight must be an int8 torch.Tensor, got {getattr(qweight, 'dtype', type(qweight).__name__)}")
    if qweight.dim() != 2 or qweight.device.type != "cpu" or not qweight.is_contiguous():
        raise ValueError(f"qweight must be a contiguous CPU tensor [out_features, in_features], got shape "
                         f"{tuple(qweight.shape)} on {qweight.device}")
    out_features, in_features = qweight.shape
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have in_features={in_features} as its last dimension, got shape {tuple(x.shape)}")
    _check_cpu_float32("scales", scales, 1)
    if scales.shape[0] != out_features:
        raise ValueError(f"scales must have shape ({out_features},), got {tuple(scales.shape)}")
    if bias is not None:
        _check_cpu_float32("bias", bias, 1)
        if bias.shape[0] != out_features:
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    shape = (*x.shape[:-1], out_features)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32)
    else:
        _check_cpu_float32("out", out, len(shape))
        if tuple(out.shape) != shape:
            raise ValueError(f"out must have shape {shape}, got {tuple(out.shape)}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    _C.int8_matmul(
        x.detach().reshape(-1, in_features).contiguous().numpy(),
        qweight.detach().numpy(),
        scales.detach().numpy(),
        None if bias is None else bias.detach().numpy(),
        out.detach().view(-1, out_features).numpy(),
        simd=simd,
        num_threads=torch.get_num_threads(),
    )
    return out


# ---- quantizer kernels: k-means and beam search ----------------------------------------------


def _check_cpu_float32(name: str, tensor: torch.Tensor, dim: int) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {tensor.dtype}")
    if tensor.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(tensor.shape)}")
    if tensor.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU, got {tensor.device}")


def kmeans(
    points: torch.Tensor,
    k: int,
    *,
    max_iter: int = 25,
    max_points_per_centroid: Optional[int] = 256,
    init: str = "random",
    seed: int = 0,
    num_threads: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd's k-means of ``points`` [n, d] float32 (d <= 64) into ``k`` centroids, in C.

    Trains on a seeded sample of ``k * max_points_per_centroid`` points when there are more (as
    faiss does; None trains on all points); the assignment and objective cover all points.
    ``init`` is "random" or "kmeans++". Returns (centroids [k, d] float32, assignment [n] int64,
    sum of squared distances).
    """
    _check_cpu_float32("points", points, 2)
    if max_points_per_centroid is not None and max_points_per_centroid < 1:
        raise ValueError(f"max_points_per_centroid must be >= 1 or None, got {max_points_per_centroid}")
    centroids, assignment, objective = _C.kmeans(
        points.detach().contiguous().numpy(),
        k,
        max_iter=max_iter,
        max_points_per_centroid=max_points_per_centroid or 0,
        init=init,
        seed=seed,
        num_threads=num_threads or torch.get_num_threads(),
    )
    return torch.from_numpy(centroids), torch.from_numpy(assignment).long(), objective


def beam_search(
    xtx: Optional[torch.Tensor],
    codebooks: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    gradient: torch.Tensor,
    losses: torch.Tensor,
    *,
    allowed: Optional[torch.Tensor] = None,
    beam_size: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    num_threads: Optional[int] = None,
) -> None:
    """One beam-search pass in C over ``codes``, minimising per output group tr((W - What) xtx (W - What)^T).

    xtx [in, in] float32, or None for the plain squared error; codebooks [M, K, og, ig] and scales
    (one per output group) are read as float32. ``codes`` (packed int8/int16 [out/og, in/ig, M]),
    ``gradient`` ([out, in] float32, (W - What) @ xtx) and ``losses`` ([out/og] float64) must be
    contiguous CPU tensors: they are updated in place. ``allowed`` [out/og, in/ig] (bool/uint8):
    only groups with allowed != 0 may change.
    """
    if xtx is not None:
        _check_cpu_float32("xtx", xtx, 2)
    _check_cpu_float32("gradient", gradient, 2)
    for name, tensor in (("codes", codes), ("gradient", gradient), ("losses", losses)):
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous: it is updated in place")
    if losses.dtype != torch.float64:
        raise TypeError(f"losses must be float64, got {losses.dtype}")
    _C.beam_search(
        None if xtx is None else xtx.detach().contiguous().numpy(),
        codebooks.detach().float().contiguous().numpy(),
        scales.detach().float().reshape(-1).contiguous().numpy(),
        codes.numpy(),
        gradient.detach().numpy(),
        losses.numpy(),
        allowed=None if allowed is None else allowed.to(torch.uint8).contiguous().numpy(),
        beam_size=beam_size,
        shuffle=shuffle,
        seed=seed,
        num_threads=num_threads or torch.get_num_threads(),
    )
