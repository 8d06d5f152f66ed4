"""Quantizing one model with several processes (``torchrun``, ``python -m aqlm quantize --nproc N``).

:class:`aqlm.distributed.World` is this process's place in the run. Work is split so that the
result does not depend on the world size:

* forward passes over the calibration windows are split into contiguous runs of whole batches
  (:meth:`World.batch_ranges`); each batch is computed by exactly one rank, with the same code and
  inputs as in a single process, and the outputs are broadcast so every rank holds all of them;
* sums over batches (X^T X) follow one fixed binary tree over the batch index
  (:func:`tree_sum`): each rank sums the largest subtrees inside its own batches, and every rank
  combines the gathered subtree sums into the upper levels exactly as a single process computes
  them. Floating-point addition is deterministic, so the total is the same for every world size;
* the linears of one input group are shared out between ranks (:func:`assign_owners`), and the
  owner broadcasts its result;
* block fine-tuning runs on rank 0 alone, which broadcasts the block's trained parameters.

A rank left without work (a group with fewer linears than ranks; every rank but 0 during
fine-tuning) waits without using its cores, so the ranks with work on the same machine borrow its
threads (:class:`CoreShare`). The result does not change: every computation here gives the same
bits at any thread count (the C kernels by construction, torch's CPU kernels as measured by
``tests/test_distributed_quantize.py``), with one exception: on CPUs with AMX, torch's bfloat16
products (oneDNN's AMX kernels) split long sums between threads, so bfloat16 fine-tuning gives
other bits at another thread count. Rank 0 fine-tunes with the threads of every process on its
machine, so the checkpoint is that of one process with that many threads (``--threads`` x
processes), whatever the CPU.
"""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Optional, TypeVar

import torch
import torch.distributed as dist

from ..calibration import run_block
from ..distributed import World

T = TypeVar("T")


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


@dataclass(frozen=True)
class CoreShare:
    """Each rank's machine and threads, for ranks with work to borrow the threads of the idle
    ranks on their machine."""

    rank: int
    machines: tuple[str, ...]  # a key per rank: the same for ranks on one machine
    threads: tuple[int, ...]  # each rank's own thread count

    @classmethod
    def gather(cls, world: World, threads: int) -> "CoreShare":
        """Every rank's machine (host name and torchrun's node rank) and ``threads``; a collective call."""
        mine = (f"{socket.gethostname()}/{os.environ.get('GROUP_RANK', '0')}", threads)
        everyone = [mine]
        if world.active:
            everyone = [None] * world.size
            dist.all_gather_object(everyone, mine)
        return cls(world.rank, tuple(machine for machine, _ in everyone), tuple(count for _, count in everyone))

    def threads_with(self, busy: Collection[int]) -> int:
        """This rank's threads while only the ranks in ``busy`` have work: its own, plus, if it is
        busy, those of the idle ranks on its machine, dealt out to that machine's busy ranks in
        rank order."""
        own = self.threads[self.rank]
        if self.rank not in busy:
            return own
        here = [rank for rank, machine in enumerate(self.machines) if machine == self.machines[self.rank]]
        busy_here = [rank for rank in here if rank in busy]
        idle_here = [rank for rank in here if rank not in busy]
        return own + sum(
            self.threads[rank] for turn, rank in enumerate(idle_here) if busy_here[turn % len(busy_here)] == self.rank
        )

    def lent_to(self, busy: Collection[int]) -> int:
        """The threads the idle ranks lend this rank while only the ranks in ``busy`` have work
        (0 with one process, or when this rank is idle)."""
        return self.threads_with(busy) - self.threads[self.rank]


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """``torch.set_num_threads(count)`` for the body of the ``with``, then the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
