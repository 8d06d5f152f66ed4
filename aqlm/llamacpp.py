"""llama.cpp as a baseline: its quantized GGUF files, scored by this package's own perplexity code.

Three things, each optional and each refusing with a message that says what is missing:

* :func:`gguf_linear_bits` counts the bits per weight of a GGUF's transformer-block linears (the
  tensors AQLM quantizes), as AQLM's own rows count them, and lists their quantization types. It
  needs only the ``gguf`` package.
* :func:`make_imatrix` and :func:`quantize_gguf` run llama.cpp's ``llama-imatrix`` and
  ``llama-quantize`` tools. They are looked up in ``$AQLM_LLAMACPP_BIN``, then on ``PATH``;
  ``scripts/build_llamacpp.py`` builds them from the llama-cpp-python source release.
* :class:`LlamaCppLM` wraps a GGUF loaded by ``llama-cpp-python`` (the ``llamacpp`` extra) as a
  module whose forward pass returns logits, so that :func:`aqlm.evaluate.perplexity` scores it on
  exactly the token windows it gives any Hugging Face model.
"""
from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
from torch import nn

BIN_ENV = "AQLM_LLAMACPP_BIN"

# The linears of a transformer block in llama.cpp's tensor names (attention and MLP projections).
_BLOCK_LINEAR = re.compile(r"^blk\.(\d+)\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)\.weight$")


class LlamaCppUnavailable(RuntimeError):
    """A llama.cpp tool or the llama-cpp-python package is not installed."""


def gguf_linear_bits(path: str | os.PathLike) -> tuple[float, dict[str, dict[str, int]]]:
    """Bits per weight over the transformer-block linears of a GGUF file, and their types.

    Returns:
        ``(bits, types)``: ``bits`` is 8 x (bytes of those tensors) / (their weights), block
        scales and minimums included, as stored. ``types`` maps each projection name
        (``attn_q``, ..., ``ffn_down``) to ``{quantization type name: number of layers}``.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file holds no transformer-block linear tensors.
    """
    import gguf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} not found")
    reader = gguf.GGUFReader(path)
    weights = 0
    stored_bytes = 0
    types: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for tensor in reader.tensors:
        match = _BLOCK_LINEAR.match(tensor.name)
        if match is None:
            continue
        weights += int(tensor.n_elements)
        stored_bytes += int(tensor.n_bytes)
        types[match.group(2)][tensor.tensor_type.name] += 1
    if weights == 0:
        raise ValueError(f"{path} has no transformer-block linear tensors (blk.N.attn_q.weight, ...)")
    return 8.0 * stored_bytes / weights, {name: dict(counter) for name, counter in sorted(types.items())}


def describe_types(types: dict[str, dict[str, int]]) -> str:
    """One line such as ``attn_q IQ4_NLx30; ffn_down IQ2_XSx30`` for :func:`gguf_linear_bits`'s types."""
    return "; ".join(
        f"{name} " + ", ".join(f"{kind}x{count}" for kind, count in sorted(kinds.items()))
        for name, kinds in types.items()
    )


def find_tool(name: str) -> Path:
    """The llama.cpp executable ``name`` (e.g. ``llama-quantize``): in ``$AQLM_LLAMACPP_BIN``, else on PATH.

    Raises:
        LlamaCppUnavailable: not found; the message says how to build it.
    """
    directory = os.environ.get(BIN_ENV)
    if directory:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    if found:
        return Path(found)
    where = f"{BIN_ENV}={directory} nor on PATH" if directory else f"on PATH, and {BIN_ENV} is not set"
    raise LlamaCppUnavailable(
        f"llama.cpp's {name} was found neither {where}; build it with `python scripts/build_llamacpp.py` "
        f"and set {BIN_ENV} to the directory it prints"
    )


def _run_tool(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-2000:]
        raise RuntimeError(f"{what} failed (exit {result.returncode}): `{' '.join(command)}`\n{tail}")


def make_imatrix(
    model: str | os.PathLike, text: str | os.PathLike, out: str | os.PathLike, ctx: int = 512,
    chunks: int = 100, threads: Optional[int] = None,
) -> Path:
    """Run ``llama-imatrix`` on ``text`` (first ``chunks`` windows of ``ctx`` tokens); returns ``out``.

    An existing ``out`` is kept (the importance matrix of an earlier call with the same arguments).
    """
    out = Path(out)
    if out.is_file():
        return out
    partial = out.with_name(out.name + ".partial.gguf")
    command = [str(find_tool("llama-imatrix")), "-m", str(model), "-f", str(text), "-o", str(partial),
               "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads or torch.get_num_threads())]
    _run_tool(command, "llama-imatrix")
    partial.replace(out)
    return out


def quantize_gguf(
    source: str | os.PathLike, out: str | os.PathLike, kind: str, imatrix: Optional[str | os.PathLike] = None,
    threads: Optional[int] = None,
) -> Path:
    """Requantize ``source`` to llama.cpp type ``kind`` (``Q4_K_M``, ``IQ2_XS``, ...) with ``llama-quantize``.

    The source may itself be quantized (``--allow-requantize``: llama.cpp de-quantizes it first).
    An existing ``out`` is kept. Returns ``out``.
    """
    out = Path(out)
    if out.is_file():
        return out
    partial = out.with_name(out.name + ".partial.gguf")
    command = [str(find_tool("llama-quantize")), "--allow-requantize"]
    if imatrix is not None:
        command += ["--imatrix", str(imatrix)]
    command += [str(source), str(partial), kind, str(threads or torch.get_num_threads())]
    _run_tool(command, f"llama-quantize to {kind}")
    partial.replace(out)
    return out


class _Output(SimpleNamespace):
    logits: torch.Tensor


class LlamaCppLM(nn.Module):
    """A GGUF model run by llama.cpp, called like a Hugging Face causal LM: ``model(input_ids=ids).logits``.

    Each row of ``input_ids`` is evaluated from an empty context, exactly those ids (no BOS is
    added), with logits for every position. ``config.max_position_embeddings`` is ``n_ctx``.

    Raises:
        LlamaCppUnavailable: llama-cpp-python is not installed (``pip install aqlm[llamacpp]``).
    """

    def __init__(self, path: str | os.PathLike, n_ctx: int = 2048, threads: Optional[int] = None):
        super().__init__()
        try:
            import llama_cpp
        except ImportError as error:
            raise LlamaCppUnavailable(
                f"llama-cpp-python is not installed ({error}); install the extra: pip install 'aqlm[llamacpp]'"
            ) from None
        except (OSError, RuntimeError) as error:  # installed, but its shared library does not load
            raise LlamaCppUnavailable(f"llama-cpp-python is installed but its llama.cpp library fails to load: {error}") from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} not found")
        self.llama = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=True,
            n_threads=threads or torch.get_num_threads(), verbose=False,
        )
        self.config = SimpleNamespace(vocab_size=self.llama.n_vocab(), max_position_embeddings=n_ctx)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> _Output:
        """Logits ``[batch, length, vocab]`` (float32) of every position of every row."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"rows of {length} tokens exceed the context of {self.config.max_position_embeddings}")
        rows = []
        for row in input_ids.tolist():
            self.llama.reset()
            self.llama.eval(row)
            rows.append(torch.from_numpy(np.array(self.llama.scores[:length], dtype=np.float32)))
        return _Output(logits=torch.stack(rows))
