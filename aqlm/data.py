"""Text and token data for calibration and evaluation.

The protocol is the one of GPTQ and AQLM (``get_loaders``): a corpus is joined into one string,
tokenized once, and then cut into windows of ``seqlen`` tokens, either random windows (calibration)
or consecutive non-overlapping ones (perplexity).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Union

import torch

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIXES = (".pt", ".pth")

PathLike = Union[str, os.PathLike]


def load_text(path: PathLike) -> str:
    """Read a text corpus.

    ``.txt`` files are returned exactly as stored (UTF-8); ``.jsonl`` files must hold one JSON
    object per line with a string ``"text"`` field, and those fields are joined with ``"\\n\\n"``
    (the separator GPTQ/AQLM use when joining dataset records). Blank lines are skipped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the suffix is not ``.txt``/``.jsonl``, or a JSONL line is not a record with a
            string ``"text"`` field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such text file: {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return path.read_text(encoding="utf-8")
    if suffix == ".jsonl":
        texts = []
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{str(path)!r} line {line_number} is not valid JSON: {error}") from error
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise ValueError(f"{str(path)!r} line {line_number} has no string field 'text'")
                texts.append(record["text"])
        return "\n\n".join(texts)
    raise ValueError(f"unsupported text file {str(path)!r}: expected one of {', '.join(TEXT_SUFFIXES)}")


def tokenize_text(tokenizer: Any, text: str) -> torch.LongTensor:
    """Tokenize a whole corpus at once and return its token ids as a 1-D LongTensor.

    This is a plain ``tokenizer(text)`` call: the special tokens that the tokenizer adds by
    default are kept (a Llama-2 tokenizer prepends one BOS; GPT-2 style and SmolLM2 tokenizers add
    nothing), exactly as the GPTQ/AQLM evaluation code does. The "sequence longer than the model
    maximum" warning is silenced because the ids are cut into windows afterwards.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _as_token_tensor(tokens: torch.Tensor, origin: str) -> torch.LongTensor:
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{origin} must hold integer token ids, got dtype {tokens.dtype}")
    if tokens.dim() not in (1, 2):
        raise ValueError(f"{origin} must be 1-D or 2-D, got shape {tuple(tokens.shape)}")
    return tokens.reshape(-1).to(torch.long)


def load_tokens(path_or_tensor: Union[PathLike, torch.Tensor], tokenizer: Any = None) -> torch.LongTensor:
    """Load a 1-D LongTensor of token ids.

    Accepts an integer tensor (1-D, or 2-D which is flattened row by row), a ``.pt``/``.pth``
    file holding such a tensor, or a text file (``.txt``/``.jsonl``, see :func:`load_text`) that
    is tokenized with ``tokenizer`` (see :func:`tokenize_text`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a text file is given without a tokenizer, the suffix is unknown, or the tensor
            has the wrong number of dimensions.
        TypeError: the tensor (or the object stored in the file) is not an integer tensor.
    """
    if isinstance(path_or_tensor, torch.Tensor):
        return _as_token_tensor(path_or_tensor, "token tensor")
    if not isinstance(path_or_tensor, (str, os.PathLike)):
        raise TypeError(f"expected a path or a tensor of token ids, got {type(path_or_tensor).__name__}")
    path = Path(path_or_tensor)
    if not path.is_file():
        raise FileNotFoundError(f"no such token or text file: {str(path)!r}")
    suffix = path.suffix.lower()
    if suffix in TOKEN_SUFFIXES:
        stored = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(stored, torch.Tensor):
            raise TypeError(f"{str(path)!r} holds a {type(stored).__name__}, expected a tensor of token ids")
        return _as_token_tensor(stored, f"tensor in {str(path)!r}")
    if suffix in TEXT_SUFFIXES:
        if tokenizer is None:
            raise ValueError(f"{str(path)!r} is a text file: pass a tokenizer to turn it into tokens")
        return tokenize_text(tokenizer, load_text(path))
    raise ValueError(
        f"unsupported token file {str(path)!r}: expected one of {', '.join(TOKEN_SUFFIXES + TEXT_SUFFIXES)}"
    )


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a 1-D tensor of token ids, got {shape}")


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def calibration_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """Draw ``nsamples`` random windows of ``seqlen`` consecutive tokens, as a ``[nsamples, seqlen]`` tensor.

    Like GPTQ/AQLM's ``get_loaders``: each window starts at an independent uniform position
    ``i`` in ``[0, len(tokens) - seqlen - 1]``, drawn from a ``torch.Generator`` seeded with
    ``seed`` (so the result depends only on the arguments). Windows may overlap.

    Raises:
        ValueError: ``tokens`` is not 1-D, ``nsamples``/``seqlen`` is not a positive integer, or
            there are fewer than ``seqlen + 1`` tokens.
    """
    _check_tokens(tokens)
    _check_positive_int("nsamples", nsamples)
    _check_positive_int("seqlen", seqlen)
    if tokens.numel() < seqlen + 1:
        raise ValueError(
            f"need at least seqlen + 1 = {seqlen + 1} tokens for calibration windows of {seqlen}, "
            f"got {tokens.numel()}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=generator)
    offsets = torch.arange(seqlen)
    return tokens.to(torch.long)[starts[:, None] + offsets[None, :]]


def evaluation_windows(tokens: torch.Tensor, seqlen: int) -> torch.LongTensor:
    """Cut ``tokens`` into ``len(tokens) // seqlen`` consecutive non-overlapping windows ``[n, seqlen]``.

    The incomplete tail is dropped (as in the GPTQ/AQLM perplexity evaluation), so ``n`` may be 0.
    """
    _check_tokens(tokens)
    _check_positive_int("seqlen", seqlen)
    count = tokens.numel() // seqlen
    return tokens[: count * seqlen].to(torch.long).reshape(count, seqlen)
