"""``QuantizedLinear``: the drop-in AQLM linear layer that Hugging Face Transformers builds.

Parameter names, shapes and dtypes are those of the upstream ``aqlm`` package, so checkpoints
made for it load unchanged. The forward pass goes through ``torch.ops.aqlm.quantized_matmul``:
C kernels on the CPU, the pure-torch formula elsewhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import ops
from .format import AqlmScheme, code_dtype, dequantize_reference


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored as AQLM codes, codebooks and per-output-group scales.

    Args:
        in_features, out_features: shape of the dense weight ``[out_features, in_features]``.
        in_group_size, out_group_size: one code covers ``out_group_size x in_group_size`` weights.
        num_codebooks: codes per group (their codewords are summed).
        nbits_per_codebook: bits per code; each codebook has ``2**nbits_per_codebook`` codewords.
        bias: whether the layer has a bias.
        device, dtype: of the float parameters (codebooks, scales, bias).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_group_size: int,
        out_group_size: int,
        num_codebooks: int,
        nbits_per_codebook: int,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__()
        scheme = AqlmScheme(num_codebooks, nbits_per_codebook, in_group_size, out_group_size)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        scheme.check_shape(out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.in_group_size, self.out_group_size = in_group_size, out_group_size
        self.num_codebooks, self.nbits_per_codebook = num_codebooks, nbits_per_codebook
        self.codebook_size = 2**nbits_per_codebook
        num_out_groups, num_in_groups = out_features // out_group_size, in_features // in_group_size
        factory = {"device": device, "dtype": dtype}
        self.codebooks = nn.Parameter(
            torch.empty(num_codebooks, self.codebook_size, out_group_size, in_group_size, **factory),
            requires_grad=False,
        )
        self.codes = nn.Parameter(
            torch.empty(num_out_groups, num_in_groups, num_codebooks, device=device, dtype=code_dtype(nbits_per_codebook)),
            requires_grad=False,
        )
        self.scales = nn.Parameter(torch.empty(num_out_groups, 1, 1, 1, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @property
    def scheme(self) -> AqlmScheme:
        """The configuration of this layer."""
        return AqlmScheme(self.num_codebooks, self.nbits_per_codebook, self.in_group_size, self.out_group_size)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``input @ W.T + bias``, in the dtype of ``input``."""
        if type(input) is torch.Tensor and input.is_cpu and not torch.compiler.is_compiling():
            if not torch.is_grad_enabled() or not self._wants_grad(input):
                # checks the input's shape and dtype itself, with the same errors as below; the
                # parameters straight from their dict (nn.Module.__getattr__ costs ~0.6 us each)
                weights = self._parameters
                return ops.quantized_linear_cpu(input, weights["codes"], weights["codebooks"], weights["scales"],
                                                weights["bias"])
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.shape[-1:] != (self.in_features,):
            raise ValueError(
                f"input must have in_features={self.in_features} as its last dimension, got shape {tuple(input.shape)}"
            )
        return torch.ops.aqlm.quantized_matmul(input, self.codes, self.codebooks, self.scales, self.bias)

    def _wants_grad(self, input: torch.Tensor) -> bool:
        """Whether autograd needs this call: the eager CPU path skips the custom op only when it
        does not (torch.compile and export always see the op, with its fake and autograd formulas)."""
        return any(t is not None and t.requires_grad for t in (input, self.codebooks, self.scales, self.bias))

    def dequantize(self) -> torch.Tensor:
        """The dense weight ``[out_features, in_features]`` in the codebooks' dtype."""
        return ops.dequantize(self.codes, self.codebooks, self.scales)

    def reference_weight(self) -> torch.Tensor:
        """The dense weight by the pure-torch defining formula, in float32 (for checks)."""
        return dequantize_reference(self.codes, self.codebooks, self.scales)

    @classmethod
    def from_parts(
        cls,
        codes: torch.Tensor,
        codebooks: torch.Tensor,
        scales: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
    ) -> "QuantizedLinear":
        """Build a layer around existing tensors (codes in the packed storage dtype of the format)."""
        nbits = ops.check_weight(codes, codebooks, scales, bias)
        num_codebooks, _, out_group_size, in_group_size = codebooks.shape
        layer = cls(
            in_features=codes.shape[1] * in_group_size,
            out_features=codes.shape[0] * out_group_size,
            in_group_size=in_group_size,
            out_group_size=out_group_size,
            num_codebooks=num_codebooks,
            nbits_per_codebook=nbits,
            bias=bias is not None,
            device="meta",
            dtype=codebooks.dtype,
        )
        layer.codes = nn.Parameter(codes.contiguous(), requires_grad=False)
        layer.codebooks = nn.Parameter(codebooks.contiguous(), requires_grad=False)
        layer.scales = nn.Parameter(scales.reshape(-1, 1, 1, 1).contiguous(), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme.name}, "
            f"bias={self.bias is not None}"
        )
