"""An LM head that decodes from int8 rows: :class:`Int8Linear` and :func:`quantize_lm_head`.

Decoding one token reads the whole LM head: SmolLM2's 49152 x 576 float32 head is 113 MB per
token, more than all its AQLM 2x8g8 linears together. An int8 copy with one float32 scale per
row reads a quarter of that (:func:`aqlm.ops.int8_linear`, which also rounds the hidden state to
int16 for exact integer dot products). Over 2,046 WikiText-2 test tokens, decoded one by one, it
changed the perplexity of SmolLM2 2x8g8 by -0.001% (with float32 hidden states, -0.002%;
``benchmarks/lut_accuracy.py --lm-heads exact,int8``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

# Up to this many tokens per call the int8 rows are read as they are (the weight once per call);
# beyond it a dense GEMM on the float weight is faster, so longer inputs (prefill of all
# positions, evaluation) use the float weight, exactly as before.
INT8_MAX_TOKENS = 8


class Int8Linear(nn.Linear):
    """An ``nn.Linear`` whose few-token float32 CPU calls read an int8 copy of its weight.

    The float weight stays the module's ``weight`` parameter (shared, not copied, when the head is
    tied to the embeddings): ``state_dict``, saving, gradients, other devices and dtypes, and
    calls of more than ``INT8_MAX_TOKENS`` tokens use it exactly as ``nn.Linear`` does. Calls
    without gradients on float32 CPU inputs of at most that many tokens return
    ``x @ (q * s[:, None]).T + bias`` with ``q`` = the weight's rows rounded to int8 and ``s``
    their scales (:func:`aqlm.ops.int8_quantize_rows`; elementwise error at most ``s / 2``). The
    int8 copy is remade when the weight is changed in place or replaced.
    """

    def __init__(self, linear: nn.Linear):
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"Int8Linear wraps an nn.Linear, got {type(linear).__name__}")
        if linear.weight.device.type != "cpu":
            raise ValueError(f"Int8Linear needs the weight on the CPU, got {linear.weight.device}")
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self._int8 = None
        self._int8_stamp = None

    def _int8_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.weight
        stamp = (id(weight), weight._version, weight.data_ptr())
        if self._int8_stamp != stamp:
            self._int8 = ops.int8_quantize_rows(weight.detach().float())
            self._int8_stamp = stamp
        return self._int8

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``input @ W.T + bias``: from the int8 rows for few float32 CPU tokens without gradients."""
        weight, bias = self.weight, self.bias
        if (
            type(input) is torch.Tensor
            and input.dtype == torch.float32
            and input.is_cpu
            and weight.is_cpu
            and (bias is None or (bias.dtype == torch.float32 and bias.is_cpu))
            and not torch.compiler.is_compiling()
            and not (torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and input.dim() >= 1
            and input.shape[-1] == self.in_features
            and input.numel() <= INT8_MAX_TOKENS * self.in_features
        ):
            return ops.int8_linear(input, *self._int8_rows(), None if bias is None else bias.detach())
        return F.linear(input, weight, bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", int8 rows up to {INT8_MAX_TOKENS} tokens"


def quantize_lm_head(model: nn.Module) -> nn.Module:
    """Replace ``model``'s output embeddings (a Transformers causal LM's ``lm_head``) by an
    :class:`Int8Linear` around the same weight, in place, and return ``model``.

    Greedy decoding through ``model.generate`` then reads the head as int8 rows; longer inputs
    and anything needing gradients use the float weight as before. The weight itself is not
    changed, so ``save_pretrained`` writes what it wrote before.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, Int8Linear):
        return model
    if type(head) is not nn.Linear:
        found = "nothing" if head is None else type(head).__name__
        raise ValueError(f"quantize_lm_head needs a model whose get_output_embeddings() is an nn.Linear, got {found}")
    model.set_output_embeddings(Int8Linear(head))
    return model
