"""Tiny seeded random decoders for the tests (no downloads)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


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

