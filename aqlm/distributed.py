"""This process's place in a ``torch.distributed`` run (``torchrun``, ``python -m aqlm ... --nproc N``).

One :class:`World` serves quantization and PV-Tuning: rank and world size, how to share items
out, and the few collectives both use. With one process (``size == 1``) no ``torch.distributed``
call is made, so a single process needs no process group. :func:`process_group` joins the group
``torchrun`` describes in the environment (gloo on CPU, nccl on CUDA) and leaves it afterwards.

What each job splits, and why its result does not depend on the number of processes, is in
:mod:`aqlm.quantize.distributed` and :mod:`aqlm.pv_tuning.train`.
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, TypeVar

import torch
import torch.distributed as dist

BUCKET_ELEMENTS = 1 << 24  # gradient elements per all-reduce (64 MiB of float32)
GIL_HANDOVER_S = 0.05  # how long leave_process_group lets gloo's worker threads take the GIL

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

    @property
    def active(self) -> bool:
        """Whether there are several processes."""
        return self.size > 1

    def batch_ranges(self, count: int) -> list[range]:
        """``count`` items split into ``size`` contiguous runs, one per rank, sizes differing by at most one."""
        bounds = [count * rank // self.size for rank in range(self.size + 1)]
        return [range(bounds[rank], bounds[rank + 1]) for rank in range(self.size)]

    def share(self, count: int) -> slice:
        """This rank's run of :meth:`batch_ranges` as a slice."""
        mine = self.batch_ranges(count)[self.rank]
        return slice(mine.start, mine.stop)

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.active:
            dist.barrier()

    def broadcast_object(self, value: Any, src: int) -> Any:
        """``value`` of rank ``src`` (pickled; tensors keep their exact bits), returned on every rank."""
        if not self.active:
            return value
        holder = [value if self.rank == src else None]
        dist.broadcast_object_list(holder, src=src)
        return holder[0]

    def broadcast_tensor(self, tensor: torch.Tensor, src: int) -> None:
        """Overwrite ``tensor`` (contiguous, the same shape on every rank) with rank ``src``'s values."""
        if self.active and tensor.numel():
            dist.broadcast(tensor, src=src)

    def on_main(self, function: Callable[[], T]) -> T:
        """Run ``function`` on rank 0 and give its result, or raise its exception, on every rank."""
        if not self.active:
            return function()
        message: list[Any] = [None, None]
        if self.is_main:
            try:
                message[0] = function()
            except Exception as error:  # re-raised below on every rank, this one included
                message[1] = error
        message = self.broadcast_object(message, src=0)
        if message[1] is not None:
            raise message[1]
        return message[0]

    def sum_floats(self, values: list[float]) -> list[float]:
        """The sums over the ranks of ``values`` (float64)."""
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over the ranks (in buckets of at most ``BUCKET_ELEMENTS``)."""
        if not self.active:
            return
        bucket: list[torch.Tensor] = []
        size = 0
        for grad in [p.grad for p in parameters if p.grad is not None] + [None]:
            if grad is not None and (not bucket or size + grad.numel() <= BUCKET_ELEMENTS):
                bucket.append(grad)
                size += grad.numel()
                continue
            if bucket:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset : offset + g.numel()].view_as(g))
                    offset += g.numel()
            bucket, size = ([grad], grad.numel()) if grad is not None else ([], 0)

    def check_identical(self, tensors: Iterable[torch.Tensor], what: str) -> None:
        """Raise RuntimeError unless ``tensors`` hold the same bits on every rank (compared by an exact digest)."""
        if not self.active:
            return
        digest = torch.zeros(2, dtype=torch.int64)
        for index, tensor in enumerate(tensors):
            flat = tensor.detach().contiguous().reshape(-1)
            if flat.is_floating_point():
                flat = flat.float().view(torch.int32)
            flat = flat.to(torch.int64)
            digest[0] += int(flat.sum())
            digest[1] += int((flat * (index + 1)).remainder(1_000_003).sum())
        low, high = digest.clone(), digest.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"the ranks' {what} differ: the processes lost synchronisation")


def environment_world_size(environ: Optional[Mapping[str, str]] = None) -> int:
    """The ``WORLD_SIZE`` that ``torchrun`` sets for its processes (1 outside ``torchrun``).

    Raises:
        ValueError: ``WORLD_SIZE`` is not a positive integer.
    """
    value = (os.environ if environ is None else environ).get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"the environment variable WORLD_SIZE must be a positive integer, got {value!r}")
    return size


@contextlib.contextmanager
def process_group(device: torch.device, environ: Optional[Mapping[str, str]] = None) -> Iterator[World]:
    """The :class:`World` of this process: joins the ``torchrun`` process group described by
    ``WORLD_SIZE``/``RANK`` (``MASTER_ADDR``, ``MASTER_PORT``) if this process is one of several and
    has not joined yet, with gloo on CPU and nccl when ``device`` is CUDA, and leaves it on exit.
    A single process when ``WORLD_SIZE`` is unset or 1.

    Raises:
        ValueError: ``WORLD_SIZE`` is not a positive integer, or this torch has no torch.distributed.
    """
    environ = os.environ if environ is None else environ
    size = environment_world_size(environ)
    joined = False
    if size > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise ValueError(f"WORLD_SIZE={size} asks for {size} processes, but this torch has no torch.distributed")
        if device.type == "cuda":
            torch.cuda.set_device(int(environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        joined = True
    try:
        yield World.current()
    finally:
        if joined:
            leave_process_group()


def leave_process_group() -> None:
    """Destroy the default process group, then release the GIL for a moment (``GIL_HANDOVER_S``).

    A gloo worker thread frees a finished collective's tensors after the caller's ``wait`` has
    returned, and freeing a tensor whose Python object is owned by C++ takes the GIL. A process that
    starts shutting down its interpreter while such a thread is still waiting for the GIL aborts
    ("terminate called without an active exception", SIGABRT, after all its work is done): the thread
    is ended inside a destructor. ``destroy_process_group`` does not always prevent it, because the
    group outlives it when something still holds it (``torch.distributed.optim`` imported after the
    group was created keeps it as a default argument, and it outlives a ``fully_shard`` run too).
    Sleeping hands the GIL to those threads while the interpreter is whole.
    """
    dist.destroy_process_group()
    time.sleep(GIL_HANDOVER_S)
