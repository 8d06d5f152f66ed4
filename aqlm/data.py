"""Text and token data for calibration and evaluation.

The protocol is the one of GPTQ and AQLM (``get_loaders``): a corpus is joined into one string,
tokenized once, and then cut into windows of ``seqlen`` tokens, either random windows (calibration)
or consecutive non-overlapping ones (perplexity). 2-D token data ``[n, length]`` holds independent
sequences instead (e.g. samples from a dense model): their windows are the rows' prefixes
(:func:`prepare_windows`, used by PV-Tuning).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIXES = (".pt", ".pth")

PathLike = Union[str, os.PathLike]
Dataset = Union[PathLike, torch.Tensor]


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


def _check_token_range(tokens: torch.Tensor, vocab_size: int, what: str) -> None:
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"{what} holds token ids in [{int(tokens.min())}, {int(tokens.max())}] but the model's vocabulary has "
            f"{vocab_size} entries"
        )


def token_rows(dataset: Dataset) -> Optional[torch.LongTensor]:
    """The dataset as ``[n, length]`` independent sequences if it is (or a .pt file holds) a 2-D integer tensor.

    Returns None for text files and 1-D token streams.
    """
    if isinstance(dataset, torch.Tensor):
        stored = dataset
    else:
        path = Path(dataset)
        if path.suffix.lower() not in TOKEN_SUFFIXES or not path.is_file():
            return None
        stored = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(stored, torch.Tensor) or stored.dim() != 2 or stored.is_floating_point():
        return None
    return stored.to(torch.long)


def training_windows(data: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """``[nsamples, seqlen]`` training windows of a 1-D stream or of 2-D independent sequences.

    A stream gives :func:`calibration_windows`; rows ``[n, length]`` give the first ``seqlen``
    tokens of each row, in consecutive seeded random orders of all rows (rows repeat when
    ``nsamples > n``).

    Raises:
        ValueError: no row, or fewer than ``seqlen + 1`` tokens in a stream.
    """
    if data.dim() == 2:
        if data.shape[0] == 0:
            raise ValueError("too few sequences: none is left for training after holding out the evaluation ones")
        generator = torch.Generator().manual_seed(seed)
        rounds = -(-nsamples // data.shape[0])
        order = torch.cat([torch.randperm(data.shape[0], generator=generator) for _ in range(rounds)])
        return data[order[:nsamples], :seqlen]
    if data.numel() < seqlen + 1:
        raise ValueError(
            f"too few tokens: training windows of {seqlen} need at least {seqlen + 1} tokens, the dataset gives "
            f"{data.numel()} for training (lower seqlen or pass more data)"
        )
    return calibration_windows(data, nsamples, seqlen, seed)


def held_out_windows(data: torch.Tensor, seqlen: int, count: int) -> torch.LongTensor:
    """At most ``count`` evaluation windows: prefixes of the rows of 2-D data, else consecutive windows of a stream.

    Raises:
        ValueError: not a single window of ``seqlen`` tokens fits.
    """
    windows = data[:count, :seqlen] if data.dim() == 2 else evaluation_windows(data, seqlen)[:count]
    if windows.shape[0] == 0 or windows.shape[1] < seqlen:
        raise ValueError(
            f"too few tokens for evaluation: one window of {seqlen} tokens is needed "
            "(pass eval_dataset, raise val_fraction or lower seqlen)"
        )
    return windows


def prepare_windows(
    dataset: Dataset,
    eval_dataset: Optional[Dataset],
    tokenizer: Any,
    *,
    nsamples: int,
    seqlen: int,
    seed: int,
    val_fraction: float,
    eval_windows: int,
    vocab_size: int,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Training windows ``[nsamples, seqlen]`` and held-out evaluation windows ``[<= eval_windows, seqlen]``.

    Text and 1-D token data form one stream: training windows start at random positions
    (:func:`calibration_windows`), evaluation windows are consecutive. 2-D token data
    ``[n, length]`` holds independent sequences (e.g. samples from the dense model, each starting
    with BOS): every window is the first ``seqlen`` tokens of a row, training rows in a seeded
    random order (:func:`training_windows`). Without ``eval_dataset``, the last ``val_fraction`` of
    the tokens (or of the rows, at least one) is held out for evaluation and the training windows
    come from the rest. The result depends only on the arguments.

    Raises:
        ValueError: too few tokens (or rows shorter than ``seqlen``), or ids outside ``[0, vocab_size)``.
    """
    tokens = load_tokens(dataset, tokenizer)
    _check_token_range(tokens, vocab_size, "the dataset")
    rows = token_rows(dataset)
    if rows is not None and rows.shape[1] < seqlen:
        raise ValueError(f"the dataset's sequences have {rows.shape[1]} tokens, fewer than seqlen = {seqlen}")
    if eval_dataset is None:
        if rows is not None:
            held = max(1, int(round(rows.shape[0] * val_fraction)))
            train_data, eval_data = rows[:-held], rows[-held:]
        else:
            split = int(tokens.numel() * (1 - val_fraction))
            train_data, eval_data = tokens[:split], tokens[split:]
    else:
        train_data = rows if rows is not None else tokens
        eval_tokens = load_tokens(eval_dataset, tokenizer)
        _check_token_range(eval_tokens, vocab_size, "the evaluation dataset")
        eval_rows = token_rows(eval_dataset)
        eval_data = eval_rows if eval_rows is not None else eval_tokens
    return training_windows(train_data, nsamples, seqlen, seed), held_out_windows(eval_data, seqlen, eval_windows)
