"""Loader for Karpathy's llama2.c legacy ``.bin`` checkpoints.

File layout (all little-endian): a header of 7 int32 ``dim, hidden_dim, n_layers,
n_heads, n_kv_heads, vocab_size, seq_len``, then float32 arrays in this order::

    token_embedding [vocab, dim]
    rms_att [L, dim]
    wq [L, dim, dim]; wk [L, kv_dim, dim]; wv [L, kv_dim, dim]; wo [L, dim, dim]
    rms_ffn [L, dim]
    w1 [L, hidden, dim]; w2 [L, dim, hidden]; w3 [L, hidden, dim]
    rms_final [dim]
    freq_cis_real [seq_len, head_dim / 2]; freq_cis_imag [seq_len, head_dim / 2]  (unused)
    wcls [vocab, dim]  (only when the header's vocab_size is negative)

A positive ``vocab_size`` means the classifier shares the token embedding; a negative
one means a separate classifier follows at the end of the file.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
HEADER_BYTES = 4 * len(HEADER_FIELDS)
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5
BOS_TOKEN_ID = 1


@dataclass(frozen=True)
class Llama2cHeader:
    """Hyper-parameters stored in a llama2.c checkpoint header.

    ``vocab_size`` is always positive here; ``shared_classifier`` records the sign the
    file used (positive: classifier tied to the token embedding).
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        """Total width of the key (and value) projection."""
        return self.n_kv_heads * self.head_dim

    def tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the float32 arrays in file order, unused ones included."""
        L, d, h, kv = self.n_layers, self.dim, self.hidden_dim, self.kv_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("token_embedding", (self.vocab_size, d)),
            ("rms_att", (L, d)),
            ("wq", (L, d, d)),
            ("wk", (L, kv, d)),
            ("wv", (L, kv, d)),
            ("wo", (L, d, d)),
            ("rms_ffn", (L, d)),
            ("w1", (L, h, d)),
            ("w2", (L, d, h)),
            ("w3", (L, h, d)),
            ("rms_final", (d,)),
            ("freq_cis_real", (self.seq_len, self.head_dim // 2)),
            ("freq_cis_imag", (self.seq_len, self.head_dim // 2)),
        ]
        if not self.shared_classifier:
            shapes.append(("wcls", (self.vocab_size, d)))
        return shapes

    def expected_bytes(self) -> int:
        """Exact size in bytes of a well-formed file with this header."""
        n_floats = sum(math.prod(shape) for _, shape in self.tensor_shapes())
        return HEADER_BYTES + 4 * n_floats


def read_llama2c_header(path: str | os.PathLike) -> Llama2cHeader:
    """Read and validate the header of a llama2.c ``.bin`` file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the header is short or holds an impossible value, or the file size
            differs from the size the header implies (the message gives both byte counts).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c checkpoint not found: {path}")
    actual = path.stat().st_size
    if actual < HEADER_BYTES:
        raise ValueError(
            f"{path}: {actual} bytes is too short for a llama2.c checkpoint "
            f"(the header alone is {HEADER_BYTES} bytes)"
        )
    raw = np.fromfile(path, dtype="<i4", count=len(HEADER_FIELDS))
    fields = dict(zip(HEADER_FIELDS, (int(v) for v in raw)))
    for name, value in fields.items():
        if name != "vocab_size" and value <= 0:
            raise ValueError(f"{path}: bad llama2.c header field {name}={value} (must be positive)")
    if fields["vocab_size"] == 0:
        raise ValueError(f"{path}: bad llama2.c header field vocab_size=0")
    if fields["dim"] % fields["n_heads"]:
        raise ValueError(
            f"{path}: bad llama2.c header: dim={fields['dim']} is not divisible by "
            f"n_heads={fields['n_heads']}"
        )
    if fields["n_heads"] % fields["n_kv_heads"]:
        raise ValueError(
            f"{path}: bad llama2.c header: n_heads={fields['n_heads']} is not divisible by "
            f"n_kv_heads={fields['n_kv_heads']}"
        )
    if (fields["dim"] // fields["n_heads"]) % 2:
        raise ValueError(
            f"{path}: bad llama2.c header: head_dim={fields['dim'] // fields['n_heads']} "
            "must be even for rotary embeddings"
        )
    header = Llama2cHeader(
        dim=fields["dim"],
        hidden_dim=fields["hidden_dim"],
        n_layers=fields["n_layers"],
        n_heads=fields["n_heads"],
        n_kv_heads=fields["n_kv_heads"],
        vocab_size=abs(fields["vocab_size"]),
        seq_len=fields["seq_len"],
        shared_classifier=fields["vocab_size"] > 0,
    )
    expected = header.expected_bytes()
    if actual != expected:
        problem = "truncated" if actual < expected else "too long"
        raise ValueError(
            f"{path}: file is {problem}: the header {fields} implies {expected} bytes, "
            f"but the file has {actual} bytes"
        )
    return header


def llama2c_config(header: Llama2cHeader) -> LlamaConfig:
    """The Hugging Face ``LlamaConfig`` equivalent to a llama2.c header."""
    return LlamaConfig(
        vocab_size=header.vocab_size,
        hidden_size=header.dim,
        intermediate_size=header.hidden_dim,
        num_hidden_layers=header.n_layers,
        num_attention_heads=header.n_heads,
        num_key_value_heads=header.n_kv_heads,
        head_dim=header.head_dim,
        max_position_embeddings=header.seq_len,
        rms_norm_eps=RMS_NORM_EPS,
        rope_theta=ROPE_THETA,
        hidden_act="silu",
        tie_word_embeddings=header.shared_classifier,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=None,
        pad_token_id=None,
    )


def permute_rotary_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from llama2.c's interleaved RoPE to HF's rotate-half.

    llama2.c rotates the pairs ``(2j, 2j+1)`` of each head; Hugging Face rotates
    ``(j, j + head_dim/2)``. Moving row ``2j + p`` of every head to ``p * head_dim/2 + j``
    makes the two formulations compute the same attention scores.
    """
    rows, cols = weight.shape
    return (
        weight.reshape(n_heads, rows // n_heads // 2, 2, cols)
        .transpose(0, 2, 1, 3)
        .reshape(rows, cols)
    )


def _read_arrays(path: Path, header: Llama2cHeader) -> dict[str, np.ndarray]:
    flat = np.memmap(path, dtype="<f4", mode="r", offset=HEADER_BYTES)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in header.tensor_shapes():
        size = math.prod(shape)
        arrays[name] = flat[offset : offset + size].reshape(shape)
        offset += size
    return arrays


def load_llama2c(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Load a llama2.c legacy ``.bin`` checkpoint as a Hugging Face ``LlamaForCausalLM``.

    The q/k projections are permuted (see :func:`permute_rotary_rows`) so the model
    reproduces llama2.c's logits. RoPE theta is 10000, RMSNorm epsilon 1e-5 and the
    context length is the header's ``seq_len``. llama2.c has no end-of-sequence token
    (its sampler stops at the BOS token 1, which delimits stories), so
    ``eos_token_id`` is left unset and generation runs for the requested length.

    Args:
        path: the ``.bin`` file.
        dtype: parameter dtype of the returned model.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the header is invalid or the file size does not match it.
    """
    path = Path(path)
    header = read_llama2c_header(path)
    arrays = _read_arrays(path, header)

    def tensor(array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(array, dtype=np.float32))

    state: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": tensor(arrays["token_embedding"]),
        "model.norm.weight": tensor(arrays["rms_final"]),
        "lm_head.weight": tensor(arrays["token_embedding" if header.shared_classifier else "wcls"]),
    }
    for i in range(header.n_layers):
        prefix = f"model.layers.{i}."
        state.update(
            {
                prefix + "input_layernorm.weight": tensor(arrays["rms_att"][i]),
                prefix + "self_attn.q_proj.weight": tensor(permute_rotary_rows(arrays["wq"][i], header.n_heads)),
                prefix + "self_attn.k_proj.weight": tensor(permute_rotary_rows(arrays["wk"][i], header.n_kv_heads)),
                prefix + "self_attn.v_proj.weight": tensor(arrays["wv"][i]),
                prefix + "self_attn.o_proj.weight": tensor(arrays["wo"][i]),
                prefix + "post_attention_layernorm.weight": tensor(arrays["rms_ffn"][i]),
                prefix + "mlp.gate_proj.weight": tensor(arrays["w1"][i]),
                prefix + "mlp.down_proj.weight": tensor(arrays["w2"][i]),
                prefix + "mlp.up_proj.weight": tensor(arrays["w3"][i]),
            }
        )
    del arrays

    config = llama2c_config(header)
    model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=True)
    model.to(dtype)
    model.config.dtype = dtype
    model.eval()
    return model
