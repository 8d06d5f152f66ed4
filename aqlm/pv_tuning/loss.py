"""The PV-Tuning objective and evaluation: KL divergence from the dense teacher to the student.

The training loss is the mean over all token positions of
``KL(p_teacher || p_student) = sum_v p_t(v) (log p_t(v) - log p_s(v))`` between the next-token
distributions (float32 softmax of the logits), in nats. It equals the cross-entropy to the
teacher's distribution minus the teacher's entropy, which does not depend on the student, so the
gradients are those of distillation by cross-entropy; the KL form is reported because it is 0
for a perfect student. (Upstream AQLM's ``finetune.py`` minimises the same quantity with
``F.kl_div(..., log_target=True, reduction="batchmean")``.)

Logits are never materialised for whole windows: both models run their decoder to hidden states,
and the output heads are applied to a bounded number of positions at a time. In training each
chunk is recomputed in the backward pass (activation checkpointing), so at most one chunk of
``[batch, positions, vocab]`` logits is alive at any time.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSS_CHUNK_ELEMENTS = 1 << 24  # logits per chunk and model (64 MiB of float32)


def split_decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(model.model, output head)`` of a causal LM whose logits are ``head(decoder(ids)[0])``.

    Raises:
        ValueError: the model has no such structure, or post-processes its logits (softcapping).
    """
    decoder = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        raise ValueError(
            f"{type(model).__name__} is not supported: expected a causal LM with a decoder at .model and an output head"
        )
    config = getattr(model, "config", None)
    for attribute in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attribute, None) is not None:
            raise ValueError(f"models with {attribute} are not supported by the chunked distillation loss")
    return decoder, head


def autocast_context(bf16: bool):
    """CPU bfloat16 autocast when ``bf16``, else a no-op context."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()


def hidden_states(decoder: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[batch, length, hidden]`` of a Transformers decoder."""
    output = decoder(input_ids=ids, use_cache=False)
    return output[0] if isinstance(output, (tuple, list)) else output.last_hidden_state


def position_chunks(length: int, batch: int, vocab: int, elements: int = 0) -> Iterator[tuple[int, int]]:
    """``(start, end)`` position ranges with at most ``elements`` logits per ``[batch, positions, vocab]`` chunk."""
    step = max(1, (elements or LOSS_CHUNK_ELEMENTS) // max(1, batch * vocab))
    for start in range(0, length, step):
        yield start, min(length, start + step)


def _kl_sum(student_hidden, teacher_hidden, student_head, teacher_head, bf16: bool) -> torch.Tensor:
    with autocast_context(bf16):
        student_logits = student_head(student_hidden)
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)
    if log_p.shape != log_q.shape:
        raise ValueError(f"vocabulary sizes differ: teacher {log_p.shape[-1]}, student {log_q.shape[-1]}")
    return (log_p.exp() * (log_p - log_q)).sum()


def distillation_loss_sum(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: nn.Module,
    teacher_head: nn.Module,
    bf16: bool = False,
) -> torch.Tensor:
    """Sum over all positions of ``KL(teacher || student)``, differentiable for the student.

    Hidden states are ``[batch, length, hidden]``; the heads map them to logits chunk by chunk,
    each chunk checkpointed so that its logits are recomputed in the backward pass.
    """
    batch, length = student_hidden.shape[:2]
    vocab = getattr(student_head, "out_features", None) or getattr(student_head, "num_embeddings", 1 << 16)
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start, end in position_chunks(length, batch, vocab):
        args = (student_hidden[:, start:end], teacher_hidden[:, start:end], student_head, teacher_head, bf16)
        if torch.is_grad_enabled() and student_hidden.requires_grad:
            total = total + checkpoint(_kl_sum, *args, use_reentrant=False)
        else:
            total = total + _kl_sum(*args)
    return total


@dataclass
class Evaluation:
    """Student quality on held-out windows: perplexity of its next-token predictions and KL to the teacher."""

    perplexity: float
    kl: float
    windows: int
    seqlen: int

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {"perplexity": self.perplexity, "kl": self.kl, "windows": self.windows, "seqlen": self.seqlen}


def evaluation_sums(
    student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 4
) -> tuple[float, float]:
    """Summed next-token NLL of ``student`` and summed KL(teacher || student) over ``windows`` ``[n, seqlen]``.

    The NLL covers positions ``0..seqlen-2`` of every window, the KL all positions; both are float64
    sums, so the results of disjoint sets of windows add up (see :func:`evaluation_from_sums`).
    ``n`` may be 0 (both sums are 0).
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"evaluation windows must be a [n, seqlen >= 2] tensor, got {tuple(windows.shape)}")
    student_decoder, student_head = split_decoder_and_head(student)
    teacher_decoder, teacher_head = split_decoder_and_head(teacher)
    was_training = student.training
    student.eval()
    count, length = windows.shape
    nll = kl = 0.0
    try:
        with torch.no_grad():
            for begin in range(0, count, batch_size):
                batch = windows[begin : begin + batch_size].long()
                student_hidden = hidden_states(student_decoder, batch)
                teacher_hidden = hidden_states(teacher_decoder, batch)
                vocab = getattr(teacher_head, "out_features", 1 << 16)
                for start, end in position_chunks(length, batch.shape[0], vocab):
                    log_q = F.log_softmax(student_head(student_hidden[:, start:end]).float(), dim=-1)
                    log_p = F.log_softmax(teacher_head(teacher_hidden[:, start:end]).float(), dim=-1)
                    if log_p.shape != log_q.shape:
                        raise ValueError(
                            f"vocabulary sizes differ: teacher {log_p.shape[-1]}, student {log_q.shape[-1]}"
                        )
                    kl += float((log_p.exp() * (log_p - log_q)).sum(dim=-1).double().sum())
                    stop = min(end, length - 1)
                    if stop > start:
                        targets = batch[:, start + 1 : stop + 1]
                        picked = log_q[:, : stop - start].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                        nll -= float(picked.double().sum())
    finally:
        student.train(was_training)
    return nll, kl


def evaluation_from_sums(nll: float, kl: float, count: int, seqlen: int) -> Evaluation:
    """The :class:`Evaluation` of ``count`` windows of ``seqlen`` tokens from their :func:`evaluation_sums`."""
    return Evaluation(
        perplexity=math.exp(nll / (count * (seqlen - 1))), kl=kl / (count * seqlen), windows=count, seqlen=seqlen
    )


def evaluate_student(
    student: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int = 4
) -> Evaluation:
    """Perplexity and mean KL(teacher || student) of ``student`` on ``windows`` ``[n, seqlen]``, in float32.

    Perplexity follows the GPTQ/AQLM protocol of :func:`aqlm.evaluate.perplexity` (positions
    ``0..seqlen-2`` predict the next token; ``exp`` of the mean NLL); the KL is averaged over all
    ``n * seqlen`` positions as in :func:`aqlm.evaluate.kl_divergence`. Both come from one pass.
    """
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise ValueError(f"evaluation windows must be a non-empty [n, seqlen >= 2] tensor, got {tuple(windows.shape)}")
    nll, kl = evaluation_sums(student, teacher, windows, batch_size)
    return evaluation_from_sums(nll, kl, windows.shape[0], windows.shape[1])
