"""Data-parallel PV-Tuning over ``torch.distributed`` processes (``torchrun``).

Every process (rank) holds the whole teacher and student and the same calibration windows and
step schedule. A step's global batch of ``batch_size`` windows is cut into ``world_size``
contiguous shares; each rank runs forward/backward on its share, scaling its loss by the number
of tokens of the *global* batch, so the sum of the ranks' gradients is the gradient of the
single-process loss. :meth:`Distributed.sum_gradients` all-reduces (sums) the gradients; every
rank then holds the same gradients, bit for bit (a collective's result is the same on every
rank), and runs the same deterministic P step (Adam/LAMB) and V step (re-encoding with the same
seeded generator) on the same state, so the codes, codebooks and scales stay identical on all
ranks without being sent around. :meth:`Distributed.check_identical` verifies that with an exact
digest. Evaluation windows are split across the ranks and their sums all-reduced. Only rank 0
writes files; decisions that depend on files (output checks, reading a checkpoint) are made on
rank 0 and broadcast, so ranks on other machines need no shared file system for them.

The trainer runs on the CPU (the V step's beam search is C code on CPU tensors), so the
process group uses the gloo backend.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch

BACKEND = "gloo"
BUCKET_ELEMENTS = 1 << 24  # gradient elements per all-reduce (64 MiB of float32)

T = TypeVar("T")


def environment_world_size() -> int:
    """The ``WORLD_SIZE`` that ``torchrun`` sets for its processes (1 outside ``torchrun``)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable WORLD_SIZE must be an integer, got {value!r}") from None


def init_from_environment() -> bool:
    """Join the ``torchrun`` process group (gloo) if this process is one of several and has not joined yet.

    Returns True when it initialised the group (the caller then destroys it with
    ``torch.distributed.destroy_process_group``).
    """
    import torch.distributed as dist

    if environment_world_size() <= 1 or dist.is_initialized():
        return False
    dist.init_process_group(backend=BACKEND)
    return True


def check_batch_split(batch_size: int, microbatch_size: int, world_size: int) -> int:
    """The windows per rank and step; raises ValueError unless ``batch_size`` divides into whole microbatches per rank.

    A single process keeps the last, smaller microbatch of a batch that ``microbatch_size`` does not divide.
    """
    if world_size == 1:
        return batch_size
    if batch_size % (world_size * microbatch_size):
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the number of processes {world_size} times "
            f"microbatch_size {microbatch_size} (= {world_size * microbatch_size}): each process takes an equal "
            "share of every batch in whole microbatches"
        )
    return batch_size // world_size


@dataclass(frozen=True)
class Distributed:
    """This process's place among the data-parallel ranks (rank 0 of 1 without ``torch.distributed``)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> "Distributed":
        """The initialised default process group, or a single process."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(rank=dist.get_rank(), world_size=dist.get_world_size())
        return cls()

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes files and logs."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """Whether there are several ranks."""
        return self.world_size > 1

    def share(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` items (shares differ in size by at most one)."""
        return slice(self.rank * count // self.world_size, (self.rank + 1) * count // self.world_size)

    def sum_gradients(self, parameters: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its sum over the ranks (in buckets of at most ``BUCKET_ELEMENTS``)."""
        if not self.active:
            return
        import torch.distributed as dist

        grads = [p.grad for p in parameters if p.grad is not None]
        bucket: list[torch.Tensor] = []
        size = 0
        for grad in grads + [None]:
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

    def sum_floats(self, values: list[float]) -> list[float]:
        """The sums over the ranks of ``values`` (float64)."""
        if not self.active:
            return list(values)
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def on_main(self, function: Callable[[], T]) -> T:
        """Run ``function`` on rank 0 and give its result, or raise its exception, on every rank."""
        if not self.active:
            return function()
        import torch.distributed as dist

        message: list[Any] = [None, None]
        if self.is_main:
            try:
                message[0] = function()
            except Exception as error:  # re-raised below on every rank, this one included
                message[1] = error
        dist.broadcast_object_list(message, src=0)
        if message[1] is not None:
            raise message[1]
        return message[0]

    def check_identical(self, tensors: Iterable[torch.Tensor], what: str) -> None:
        """Raise RuntimeError unless ``tensors`` hold the same bits on every rank (compared by an exact digest)."""
        if not self.active:
            return
        import torch.distributed as dist

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
            raise RuntimeError(f"the ranks' {what} differ: data-parallel training lost synchronisation")

