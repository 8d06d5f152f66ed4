"""Quantizing one model with several processes (``torchrun``, ``python -m aqlm quantize --nproc N``).

:class:`World` is this process's place in a ``torch.distributed`` run (rank and world size), or a
single process. Work is split so that the result does not depend on the world size:

* forward passes over the calibration windows are split into contiguous runs of whole batches
  (:meth:`World.batch_ranges`); each batch is computed by exactly one rank, with the same code and
  inputs as in a single process, and the outputs are broadcast so every rank holds all of them;
* sums over batches (X^T X) follow one fixed binary tree over the batch index
  (:func:`tree_sum`): each rank sums the largest subtrees inside its own batches, and every rank
  combines the gathered subtree sums into the upper levels exactly as a single process computes
  them. Floating-point addition is deterministic, so the total is the same for every world size;
* the linears of one input group are shared out between ranks (:func:`assign_owners`), and the
  owner broadcasts its result.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist

from ..calibration import run_block

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's ``rank`` among ``size`` processes (``size == 1``: no torch.distributed calls)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "World":
        """The default torch.distributed process group when it is initialized, else a single process."""
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one process that writes files and logs."""
        return self.rank == 0

    def batch_ranges(self, count: int) -> list[range]:
        """``count`` items (batches) split into ``size`` contiguous runs, one per rank, sizes differing by at most one."""
        bounds = [count * rank // self.size for rank in range(self.size + 1)]
        return [range(bounds[rank], bounds[rank + 1]) for rank in range(self.size)]

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.size > 1:
            dist.barrier()

    def broadcast_object(self, value: Any, src: int) -> Any:
        """``value`` of rank ``src`` (pickled; tensors keep their exact bits), returned on every rank."""
        if self.size == 1:
            return value
        holder = [value if self.rank == src else None]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def broadcast_tensor(self, tensor: torch.Tensor, src: int) -> None:
        """Overwrite ``tensor`` (contiguous, the same shape on every rank) with rank ``src``'s values."""
        if self.size > 1 and tensor.numel():
            dist.broadcast(tensor, src=src)


def init_from_environment(device: torch.device, environ: Optional[Mapping[str, str]] = None) -> World:
    """Join the ``torchrun`` process group described by ``WORLD_SIZE``/``RANK`` (``MASTER_ADDR``,
    ``MASTER_PORT``), with the gloo backend on CPU and nccl when ``device`` is CUDA; a single
    process when ``WORLD_SIZE`` is unset or 1."""
    environ = os.environ if environ is None else environ
    size = int(environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={size} asks for {size} processes, but this torch has no torch.distributed")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return World.current()


def tree_nodes(lo: int, hi: int, start: int, stop: int) -> list[tuple[int, int]]:
    """The largest nodes of :func:`tree_sum`'s tree over ``[lo, hi)`` lying inside ``[start, stop)``, in order."""
    if start >= stop or stop <= lo or hi <= start:
        return []
    if start <= lo and hi <= stop:
        return [(lo, hi)]
    mid = lo + (hi - lo) // 2
    return tree_nodes(lo, mid, start, stop) + tree_nodes(mid, hi, start, stop)


def tree_sum(
    lo: int, hi: int, leaf: Callable[[int], T], combine: Callable[[T, T], T], known: Optional[dict] = None
) -> T:
    """The sum of ``leaf(i)`` for ``i`` in ``[lo, hi)`` by the fixed binary tree
    ``sum(lo, hi) = combine(sum(lo, mid), sum(mid, hi))``, ``mid = lo + (hi - lo) // 2``.

    Nodes found in ``known`` (keyed by ``(lo, hi)``) are taken from it instead of being computed.
    Leaves are evaluated left to right and only one partial sum per tree level is alive at a time.
    """
    if known is not None and (lo, hi) in known:
        return known[(lo, hi)]
    if hi - lo == 1:
        return leaf(lo)
    mid = lo + (hi - lo) // 2
    left = tree_sum(lo, mid, leaf, combine, known)
    return combine(left, tree_sum(mid, hi, leaf, combine, known))


def assign_owners(sizes: list[int], world_size: int) -> list[int]:
    """An owner rank for each job of the given sizes: largest first, to the least loaded rank
    (ties to the lower rank and the earlier job), the same on every rank."""
    loads = [0] * world_size
    owners = [0] * len(sizes)
    for job in sorted(range(len(sizes)), key=lambda job: (-sizes[job], job)):
        rank = min(range(world_size), key=lambda rank: (loads[rank], rank))
        owners[job] = rank
        loads[rank] += sizes[job]
    return owners


def run_block_split(
    block: torch.nn.Module,
    inputs: torch.Tensor,
    block_kwargs: dict,
    batch_size: int,
    world: World,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`aqlm.calibration.run_block` with each rank running its own run of whole batches; the
    outputs are then broadcast from their ranks, so every rank returns all of them (``out`` may be
    ``inputs`` itself, as there)."""
    if out is None:
        out = torch.empty_like(inputs)
    windows = inputs.shape[0]
    spans = [
        slice(min(batches.start * batch_size, windows), min(batches.stop * batch_size, windows))
        for batches in world.batch_ranges(-(-windows // batch_size))
    ]
    mine = spans[world.rank]
    run_block(block, inputs[mine], block_kwargs, batch_size, out=out[mine])
    for rank, span in enumerate(spans):
        world.broadcast_tensor(out[span], src=rank)
    return out
