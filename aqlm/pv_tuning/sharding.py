"""Fully sharded PV-Tuning (``fsdp=True``, ``finetune --fsdp``): the decoder blocks under PyTorch's FSDP2.

With several processes, :func:`shard_decoders` applies ``torch.distributed.fsdp.fully_shard`` to
every decoder block of the teacher and of the (de-quantized) student, and to each decoder as the
root. Each process then keeps only its rows (``Shard(0)``) of every block parameter: the student's
de-quantized float32 weights with their gradients, straight-through buffers and V-step Adam/LAMB
moments, which are the bulk of a run's memory, and the teacher's weights. FSDP gathers a block's
weights for its forward and backward passes and reduce-scatters its gradients as sums (the loss is
already scaled by the global batch's token count). The input embeddings (tied to the output head in
many models) and the output heads stay whole on every process, as plain tensors whose gradients
:meth:`aqlm.distributed.World.sum_gradients` sums.

The quantized masters (codes, codebooks, scales: 2-3 bits per weight) stay whole and identical on
every process. Their updates use only the local rows: the codebook gradient's sums run through
the processes in rank order (:meth:`aqlm.pv_tuning.optim.QuantizedEntry.continuous_gradients`),
the scales' gradient and the re-encoded codes are gathered by rows, and the code-group selection of
the V step is made from gathered priorities with the same generator everywhere (see
:func:`aqlm.pv_tuning.reencode.reencode_codes`). Checkpoints keep the moments and buffers sharded
(``torch.distributed.checkpoint``, see :mod:`aqlm.pv_tuning.train`); one process, or another
number of them, resumes them.

This module holds the row arithmetic and the few collectives; :mod:`aqlm.pv_tuning.train` and
:mod:`aqlm.pv_tuning.optim` use them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Shard

from ..calibration import get_blocks


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a distributed tensor (an FSDP-sharded parameter, its gradient or state)."""
    return isinstance(tensor, DTensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor``: its local shard, or the tensor itself when it is not sharded."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``, gathered from every process when it is sharded (then a collective)."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


@dataclass(frozen=True)
class RowShard:
    """Rows ``start:stop`` of ``total`` held by this process, where every process holds ``chunk``
    rows but the last ones (``torch.chunk``'s split, as FSDP's ``Shard(0)``)."""

    start: int
    stop: int
    total: int
    chunk: int

    @classmethod
    def all_of(cls, rows: int) -> "RowShard":
        """All ``rows`` rows, held by this process alone."""
        return cls(0, rows, rows, rows)

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "RowShard":
        """The rows of a ``Shard(0)`` tensor held here (all of them when it is not sharded)."""
        rows = tensor.shape[0]
        if not is_sharded(tensor):
            return cls.all_of(rows)
        if tuple(tensor.placements) != (Shard(0),):
            raise ValueError(f"expected a tensor sharded by rows (Shard(0)), got placements {tensor.placements}")
        chunk = math.ceil(rows / tensor.device_mesh.size())
        start = min(rows, chunk * tensor.device_mesh.get_local_rank())
        shard = cls(start, min(rows, start + chunk), rows, chunk)
        if tensor.to_local().shape[0] != shard.stop - shard.start:
            raise RuntimeError(f"a shard of {rows} rows holds {tensor.to_local().shape[0]} rows, "
                               f"not the expected {shard.stop - shard.start}")
        return shard

    @property
    def rows(self) -> slice:
        """This process's rows as a slice."""
        return slice(self.start, self.stop)

    @property
    def distributed(self) -> bool:
        """Whether other processes hold some of the rows."""
        return self.chunk < self.total

    def in_groups(self, group_size: int) -> "RowShard":
        """The same rows counted in groups of ``group_size`` rows (AQLM's output groups).

        Raises:
            ValueError: a shard boundary falls inside a group.
        """
        if self.total % group_size or self.chunk % group_size:
            raise ValueError(
                f"a weight of {self.total} rows sharded in chunks of {self.chunk} rows does not split into whole "
                f"output groups of {group_size} rows: use a number of processes that keeps the groups whole"
            )
        return RowShard(self.start // group_size, self.stop // group_size, self.total // group_size,
                        self.chunk // group_size)

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        """The whole ``[total, ...]`` tensor from every process's ``[stop - start, ...]`` part (a collective)."""
        if not self.distributed:
            return part
        if part.dtype != torch.uint8 and not part.is_floating_point():  # as bytes: gloo lacks some integer types
            return self.gather(part.contiguous().view(torch.uint8)).view(part.dtype)
        padded = part.new_zeros((self.chunk, *part.shape[1:]))
        padded[: part.shape[0]] = part
        pieces = [torch.empty_like(padded) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, padded)
        return torch.cat(pieces)[: self.total]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (a collective when the rows are distributed)."""
        if self.distributed:
            tensor = tensor.contiguous()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def assign(tensor: torch.Tensor, value: torch.Tensor) -> None:
    """Copy ``value`` into ``tensor``: into its local rows when it is sharded, from ``value``'s own
    local rows when that is sharded alike, else from the same rows of the whole ``value``."""
    with torch.no_grad():
        local(tensor).copy_(local(value) if is_sharded(value) else value[RowShard.of(tensor).rows])


def sharded_like(reference: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A tensor laid out as ``reference`` whose local part is ``rows`` (this process's rows of
    ``reference``'s shape): sharded alike, or ``rows`` itself when ``reference`` is not sharded."""
    if not is_sharded(reference):
        return rows
    return DTensor.from_local(rows, reference.device_mesh, reference.placements, run_check=False,
                              shape=reference.shape, stride=reference.stride())


def shard_decoders(*models: nn.Module) -> None:
    """``fully_shard`` every decoder block of each Llama-style causal LM, then its decoder (``model.model``)
    as the root, leaving the input embeddings and the output head whole; gradients are reduced as sums.

    Block parameters on the meta device (the student's de-quantized weights, see
    :func:`aqlm.pv_tuning.train.dequantized_student`) get storage for this process's rows only,
    uninitialised; the others keep their values. Requires an initialised process group (gloo on CPU).
    """
    from torch.distributed.fsdp import fully_shard

    for model in models:
        decoder = model.model
        units = []
        for block in get_blocks(model):
            values = {name: p.detach() for name, p in block.named_parameters() if not p.is_meta}
            units.append(fully_shard(block))
            if len(values) < len(list(block.parameters())):
                block.to_empty(device="cpu")
                for name, parameter in block.named_parameters():
                    if name in values:
                        assign(parameter, values[name])
        units.append(fully_shard(decoder, ignored_params=set(decoder.get_input_embeddings().parameters())))
        for unit in units:
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


def local_bytes(tensors) -> int:
    """Bytes of the local parts of ``tensors`` (whole tensors count whole)."""
    return sum(local(t).numel() * local(t).element_size() for t in tensors)
