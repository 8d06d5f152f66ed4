"""A few Adam steps on a tiny AQLM Llama, in one process or sharded by FSDP2 (``fully_shard``).

    python tests/fsdp_worker.py OUT.json                                   # one process, whole batch
    torchrun --standalone --nproc-per-node 2 tests/fsdp_worker.py OUT.json # FSDP2 over gloo

Every float parameter trains (codebooks, scales, norms, embeddings); the codes stay frozen, as
in a P step or a fine-tune of the codebooks. With N processes each takes 1/N of the same global
batch, and each step also evaluates a fixed batch under ``no_grad`` (the eager CPU path and its
cached plan, across FSDP's freeing and refilling of the unsharded weights) and with grad enabled
(the custom op, which caches nothing). Rank 0 writes the
losses and the final weights (gathered whole) to OUT.json.
"""
from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from random_models import quantize_linears, tiny_llama  # noqa: E402

from aqlm.calibration import get_blocks  # noqa: E402
from aqlm.distributed import leave_process_group  # noqa: E402

STEPS, BATCH, SEQLEN, VOCAB = 3, 4, 16, 128


def quantized_model() -> torch.nn.Module:
    """tiny_llama with every block linear a 2x8g8 QuantizedLinear from k-means codebooks."""
    torch.manual_seed(0)
    model = tiny_llama(seed=0, vocab=VOCAB)
    quantize_linears(model, "2x8g8")
    for parameter in model.parameters():
        parameter.requires_grad_(parameter.is_floating_point())  # from_parts leaves the AQLM parts frozen
    return model


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter, sharded (DTensor) or not."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main(out_path: str) -> None:
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.set_num_threads(1)
    model = quantized_model()
    initial = {name: p.detach().double().flatten().clone() for name, p in model.named_parameters() if name.endswith("codebooks")}
    if distributed:
        from torch.distributed.fsdp import fully_shard

        for block in get_blocks(model):
            fully_shard(block)
        fully_shard(model)
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (BATCH, SEQLEN), generator=generator) for _ in range(STEPS)]
    held_out = torch.randint(0, VOCAB, (1, 6), generator=generator)  # few tokens: the kernels of the cached plan
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    share = BATCH // world
    losses, evaluations, op_evaluations = [], [], []
    for batch in batches:
        ids = batch[rank * share:(rank + 1) * share]
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            evaluation = model(held_out, labels=held_out).loss.detach()
        through_op = model(held_out, labels=held_out).loss.detach()  # grad enabled: the custom op, no cached plan
        loss = loss.detach()
        if distributed:
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(float(loss))
        evaluations.append(float(evaluation))
        op_evaluations.append(float(through_op))
    weights = {name: full(p.detach()).double().flatten().tolist() for name, p in model.named_parameters()
               if name.endswith(("codebooks", "scales", "codes"))}
    moved = max(float((torch.tensor(weights[name], dtype=torch.float64) - start).abs().max()) for name, start in initial.items())
    if rank == 0:
        with open(out_path, "w") as file:
            json.dump({"world": world, "losses": losses, "evaluations": evaluations, "op_evaluations": op_evaluations,
                       "weights": weights, "moved": moved}, file)
    if distributed:
        leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
