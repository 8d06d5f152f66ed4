"""Model quality: perplexity (the GPTQ/AQLM protocol) and, for models without a tokenizer, KL divergence.

Logits are never materialised for all windows at once: windows go through the model in batches,
and when the model is a Transformers causal LM with a plain output head (``model.model`` then
``lm_head``), the head is applied to a few hundred positions at a time, so a 49k-token vocabulary
costs a bounded amount of memory. Anything that behaves like ``nn.Linear`` may stand in for the
model's linears (e.g. :class:`aqlm.QuantizedLinear`).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import PathLike, evaluation_windows, load_tokens

LOGITS_CHUNK_ELEMENTS = 1 << 25  # float32 logits held at once per model (128 MiB)


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _split_head(model: nn.Module) -> Optional[Tuple[nn.Module, nn.Module]]:
    """``(decoder, head)`` when logits are exactly ``head(decoder(ids)[0])``, else None."""
    decoder, head = getattr(model, "model", None), getattr(model, "lm_head", None)
    config = getattr(model, "config", None)
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        return None
    for attribute in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attribute, None) is not None:
            return None
    return decoder, head


def _logits_source(model: nn.Module) -> Callable[[torch.Tensor], Callable[[int, int], torch.Tensor]]:
    """Map a batch of ids to a function ``(start, end) -> float32 logits of positions start:end``."""
    split = _split_head(model)

    def prepare(batch: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        if split is None:
            logits = model(input_ids=batch, use_cache=False).logits
            return lambda start, end: logits[:, start:end].float()
        decoder, head = split
        hidden = decoder(input_ids=batch, use_cache=False)[0]
        return lambda start, end: head(hidden[:, start:end]).float()

    return prepare


def _chunks(length: int, batch: int, vocab: int) -> Iterator[Tuple[int, int]]:
    step = max(1, LOGITS_CHUNK_ELEMENTS // max(1, batch * vocab))
    for start in range(0, length, step):
        yield start, min(length, start + step)


def _vocab_size(model: nn.Module) -> int:
    head = getattr(model, "lm_head", None)
    size = getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if size else 1 << 16


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def perplexity(
    model: nn.Module, tokens: torch.Tensor, seqlen: int, batch_size: int = 1, progress: bool = True
) -> float:
    """Perplexity of ``model`` on a 1-D token stream, by the GPTQ/AQLM protocol.

    ``tokens`` is cut into ``len(tokens) // seqlen`` non-overlapping windows (the tail is
    dropped); in each window, positions ``0..seqlen-2`` predict the next token. The result is
    ``exp(mean over windows of the window's mean next-token negative log-likelihood)``, which is
    what GPTQ's ``llama_eval`` computes (all windows have the same ``seqlen - 1`` targets, so this
    is also the per-token mean). Sums are kept in float64.

    Raises:
        ValueError: ``seqlen < 2``, ``tokens`` is not 1-D, or there are fewer than ``seqlen`` tokens.
    """
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 2:
        raise ValueError(f"seqlen must be an integer >= 2 (a window needs a next token to predict), got {seqlen!r}")
    _check_batch_size(batch_size)
    windows = evaluation_windows(tokens, seqlen)
    if windows.shape[0] == 0:
        raise ValueError(f"need at least seqlen = {seqlen} tokens for one evaluation window, got {tokens.numel()}")
    device = _model_device(model)
    prepare = _logits_source(model)
    vocab = _vocab_size(model)
    total = 0.0
    starts = range(0, windows.shape[0], batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="perplexity", disable=not progress):
            batch = windows[start : start + batch_size].to(device)
            logits_at = prepare(batch)
            nll = torch.zeros(batch.shape[0], dtype=torch.float64, device=device)
            for begin, end in _chunks(seqlen - 1, batch.shape[0], vocab):
                logits = logits_at(begin, end)
                targets = batch[:, begin + 1 : end + 1]
                losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
                nll += losses.reshape(batch.shape[0], -1).double().sum(dim=1)
            total += float((nll / (seqlen - 1)).sum())
    return math.exp(total / windows.shape[0])


def perplexity_on_file(
    model: nn.Module,
    tokenizer: Any,
    path: PathLike,
    seqlen: int,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """:func:`perplexity` on a text (``.txt``/``.jsonl``, tokenized whole) or token (``.pt``) file.

    See :func:`aqlm.data.load_tokens` for the accepted files and the tokenization.
    """
    return perplexity(model, load_tokens(path, tokenizer), seqlen, batch_size=batch_size, progress=progress)


def kv_cache_keyword(model: nn.Module) -> str:
    """The keyword a Hugging Face causal LM's forward takes its KV cache by: ``cache`` from
    Transformers 5.x (which deprecates the old name with a FutureWarning), ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample_sequences(
    model: nn.Module,
    num_sequences: int,
    length: int,
    seed: int,
    bos_token_id: int = 1,
    temperature: float = 1.0,
    progress: bool = True,
) -> torch.LongTensor:
    """Sample ``[num_sequences, length]`` token ids from ``model``, each starting with ``bos_token_id``.

    Tokens are drawn by ``torch.multinomial`` from ``softmax(logits / temperature)`` with a CPU
    ``torch.Generator`` seeded by ``seed``, so the result depends only on the model and the
    arguments (``temperature == 0`` picks the argmax). The model's KV cache is used when its
    outputs provide one; otherwise the whole prefix is recomputed at every step.

    Raises:
        ValueError: a count is not positive, or ``temperature`` is negative.
    """
    for name, value in (("num_sequences", num_sequences), ("length", length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    device = _model_device(model)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.full((num_sequences, 1), bos_token_id, dtype=torch.long)
    past, cache_name = None, kv_cache_keyword(model)
    with torch.no_grad():
        for _ in tqdm(range(length - 1), desc="sampling", disable=not progress):
            if past is None:
                outputs = model(input_ids=ids.to(device), use_cache=True)
            else:
                outputs = model(input_ids=ids[:, -1:].to(device), use_cache=True, **{cache_name: past})
            past = getattr(outputs, "past_key_values", None)
            logits = outputs.logits[:, -1].float().cpu()
            if temperature == 0:
                token = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                token = torch.multinomial(probs, 1, generator=generator)
            ids = torch.cat([ids, token], dim=1)
    return ids


def kl_divergence(
    model: nn.Module,
    reference_model: nn.Module,
    sequences: torch.Tensor,
    batch_size: int = 1,
    progress: bool = True,
) -> float:
    """Mean over all positions of ``KL(reference || model)`` between next-token distributions.

    For every position of every sequence (``[n, length]`` token ids), both models' next-token
    distributions are computed (``softmax`` of the float32 logits) and
    ``sum_v p_ref(v) * (log p_ref(v) - log p_model(v))`` is averaged over all ``n * length``
    positions (in nats; summed in float64). Both models must share the vocabulary.

    Raises:
        ValueError: ``sequences`` is not a non-empty 2-D tensor, or the vocabularies differ.
    """
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.numel() == 0:
        shape = tuple(sequences.shape) if isinstance(sequences, torch.Tensor) else type(sequences).__name__
        raise ValueError(f"sequences must be a non-empty [n, length] tensor of token ids, got {shape}")
    _check_batch_size(batch_size)
    vocab = _vocab_size(reference_model)
    device, reference_device = _model_device(model), _model_device(reference_model)
    prepare, prepare_reference = _logits_source(model), _logits_source(reference_model)
    length = sequences.shape[1]
    total = 0.0
    starts = range(0, sequences.shape[0], batch_size)
    with torch.no_grad():
        for start in tqdm(starts, desc="KL divergence", disable=not progress):
            batch = sequences[start : start + batch_size].to(torch.long)
            logits_at = prepare(batch.to(device))
            reference_at = prepare_reference(batch.to(reference_device))
            for begin, end in _chunks(length, batch.shape[0], vocab):
                log_p = torch.log_softmax(reference_at(begin, end), dim=-1)
                log_q = torch.log_softmax(logits_at(begin, end).to(reference_device), dim=-1)
                if log_p.shape != log_q.shape:
                    raise ValueError(
                        f"vocabulary sizes differ: reference {log_p.shape[-1]}, model {log_q.shape[-1]}"
                    )
                total += float((log_p.exp() * (log_p - log_q)).sum(dim=-1).double().sum())
    return total / sequences.numel()
