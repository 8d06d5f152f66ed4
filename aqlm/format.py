"""The AQLM weight format: code packing, the reference dequantization formula, size accounting.

Layout (identical to the upstream `aqlm` package, so checkpoints load unchanged):

- ``codes``: ``[num_out_groups, num_in_groups, num_codebooks]``, int8 when ``nbits <= 8``, int16
  when ``nbits <= 16``. A code ``c`` in ``[0, 2**nbits)`` is stored as ``c - 2**nbits`` when
  ``c >= 2**(nbits - 1)`` and read back as ``stored mod 2**nbits``.
- ``codebooks``: ``[num_codebooks, 2**nbits, out_group_size, in_group_size]``.
- ``scales``: ``[num_out_groups, 1, 1, 1]``.
- ``W[o*og + r, j*ig + i] = scales[o] * sum_m codebooks[m, code(o, j, m), r, i]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def code_dtype(nbits: int) -> torch.dtype:
    """Storage dtype of codes for ``nbits``-bit codebooks (int8 up to 8 bits, int16 up to 16)."""
    if not isinstance(nbits, int) or not 1 <= nbits <= 16:
        raise ValueError(f"nbits_per_codebook must be an integer in [1, 16], got {nbits!r}")
    return torch.int8 if nbits <= 8 else torch.int16


def pack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Store codes in ``[0, 2**nbits)`` in the two's-complement packed form and dtype of the format."""
    if codes.is_floating_point():
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**nbits):
        raise ValueError(
            f"codes must lie in [0, {2**nbits}) for {nbits}-bit codebooks, "
            f"got values in [{int(codes.min())}, {int(codes.max())}]"
        )
    wide = codes.to(torch.int32)
    wide = torch.where(wide >= 2 ** (nbits - 1), wide - 2**nbits, wide)
    return wide.to(code_dtype(nbits))


def unpack_codes(codes: torch.Tensor, nbits: int) -> torch.Tensor:
    """Read stored codes back as int64 values in ``[0, 2**nbits)``."""
    return codes.to(torch.int64) % (2**nbits)


def nbits_of(codebooks: torch.Tensor) -> int:
    """Bits per code implied by a codebooks tensor ``[M, K, og, ig]`` (K must be a power of two)."""
    if codebooks.dim() != 4:
        raise ValueError(
            "codebooks must have 4 dimensions [num_codebooks, codebook_size, out_group_size, in_group_size], "
            f"got shape {tuple(codebooks.shape)}"
        )
    size = codebooks.shape[1]
    if size < 2 or size & (size - 1) or size > 65536:
        raise ValueError(f"codebook size (codebooks.shape[1]) must be a power of two in [2, 65536], got {size}")
    return size.bit_length() - 1


def check_code_range(codes: torch.Tensor, nbits: int) -> None:
    """Raise ValueError if a stored code does not read back into ``[0, 2**nbits)`` unambiguously."""
    if nbits == torch.iinfo(codes.dtype).bits or codes.numel() == 0:
        return
    low, high = -(2 ** (nbits - 1)), 2**nbits
    wide = codes.to(torch.int32)  # 2**nbits does not fit the storage dtype when nbits = 7 or 15
    bad = (wide < low) | (wide >= high)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"code out of range for {nbits}-bit codebooks at codes{list(index)}: {int(codes[index])} "
            f"(stored codes must lie in [{low}, {high}))"
        )


def dequantize_reference(codes: torch.Tensor, codebooks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The defining formula, in float32 pure torch: dense weight ``[out_features, in_features]``.

    Works on any device; differentiable with respect to ``codebooks`` and ``scales``.
    """
    num_codebooks, codebook_size, out_group_size, in_group_size = codebooks.shape
    num_out_groups, num_in_groups, _ = codes.shape
    nbits = codebook_size.bit_length() - 1
    offsets = torch.arange(num_codebooks, device=codes.device) * codebook_size
    indices = (unpack_codes(codes, nbits) + offsets).flatten(0, 1)
    table = codebooks.float().flatten(0, 1).flatten(-2, -1)
    blocks = F.embedding_bag(indices, table, mode="sum")
    blocks = blocks.view(num_out_groups, num_in_groups, out_group_size, in_group_size)
    blocks = blocks * scales.float().view(num_out_groups, 1, 1, 1)
    return blocks.swapaxes(1, 2).reshape(num_out_groups * out_group_size, num_in_groups * in_group_size)


MAX_NUM_CODEBOOKS = 256  # the C core's limits (csrc/format.c, aqlm_format_check)
MAX_GROUP_WEIGHTS = 1 << 20


@dataclass(frozen=True)
class AqlmScheme:
    """One AQLM configuration: ``num_codebooks`` x ``nbits_per_codebook`` bits per group of
    ``out_group_size`` x ``in_group_size`` weights (written e.g. 2x8g8)."""

    num_codebooks: int
    nbits_per_codebook: int
    in_group_size: int = 8
    out_group_size: int = 1

    def __post_init__(self) -> None:
        for name in ("num_codebooks", "nbits_per_codebook", "in_group_size", "out_group_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        code_dtype(self.nbits_per_codebook)
        if self.num_codebooks > MAX_NUM_CODEBOOKS:
            raise ValueError(f"num_codebooks must be in [1, {MAX_NUM_CODEBOOKS}], got {self.num_codebooks}")
        if self.in_group_size * self.out_group_size >= MAX_GROUP_WEIGHTS:
            raise ValueError(
                f"a group of out_group_size x in_group_size = {self.out_group_size} x {self.in_group_size} weights "
                f"must hold fewer than {MAX_GROUP_WEIGHTS}"
            )

    @property
    def codebook_size(self) -> int:
        """Codewords per codebook."""
        return 2**self.nbits_per_codebook

    @property
    def name(self) -> str:
        """Short name such as ``2x8g8`` (or ``1x16g8o2`` for out_group_size 2)."""
        suffix = f"o{self.out_group_size}" if self.out_group_size != 1 else ""
        return f"{self.num_codebooks}x{self.nbits_per_codebook}g{self.in_group_size}{suffix}"

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise ValueError if the groups do not divide a weight of this shape."""
        if in_features % self.in_group_size:
            raise ValueError(f"in_group_size {self.in_group_size} does not divide in_features {in_features}")
        if out_features % self.out_group_size:
            raise ValueError(f"out_group_size {self.out_group_size} does not divide out_features {out_features}")

    def bits_per_weight(self, out_features: int, in_features: int, param_bits: int = 16) -> float:
        """Storage of codes + codebooks + scales per weight, codebooks and scales at ``param_bits``."""
        return self.storage_bits(out_features, in_features, param_bits) / (out_features * in_features)

    def storage_bits(self, out_features: int, in_features: int, param_bits: int = 16) -> int:
        """Total bits of codes, codebooks and scales for one weight of this shape."""
        self.check_shape(out_features, in_features)
        groups = (out_features // self.out_group_size) * (in_features // self.in_group_size)
        code_bits = groups * self.num_codebooks * self.nbits_per_codebook
        codebook_bits = self.num_codebooks * self.codebook_size * self.out_group_size * self.in_group_size * param_bits
        scale_bits = (out_features // self.out_group_size) * param_bits
        return code_bits + codebook_bits + scale_bits

    @classmethod
    def parse(cls, text: str) -> "AqlmScheme":
        """Parse ``MxBgG`` (e.g. ``2x8g8``, ``1x16g8``, optional ``oN`` suffix for out_group_size)."""
        import re

        match = re.fullmatch(r"(\d+)x(\d+)(?:g(\d+))?(?:o(\d+))?", text.strip())
        if not match:
            raise ValueError(f"cannot parse AQLM scheme {text!r}: expected e.g. '2x8g8' or '1x16g8'")
        m, b, g, o = match.groups()
        return cls(int(m), int(b), int(g or 8), int(o or 1))
