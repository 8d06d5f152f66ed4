"""Tiny seeded random decoders for the tests (no downloads)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aqlm import AqlmScheme, QuantizedLinear
from aqlm.calibration import find_linears, get_blocks
from aqlm.quantize.layer import LayerConfig, init_quantized_weight


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 128, attn: str = "sdpa") -> LlamaForCausalLM:
    """A random 2-3 layer Llama with grouped-query attention, in eval mode and float32."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn
    return LlamaForCausalLM(config).eval()



def quantize_linears(model, scheme: str = "2x8g8", init_max_iter: int = 3) -> None:
    """Every block linear -> QuantizedLinear from k-means codebooks (no calibration needed here)."""
    config = LayerConfig(scheme=AqlmScheme.parse(scheme), init_max_iter=init_max_iter)
    for block in get_blocks(model):
        for name, linear in find_linears(block).items():
            codes, codebooks, scales = init_quantized_weight(linear.weight.detach(), config)
            bias = None if linear.bias is None else linear.bias.detach()
            block.set_submodule(name, QuantizedLinear.from_parts(codes, codebooks, scales, bias))
