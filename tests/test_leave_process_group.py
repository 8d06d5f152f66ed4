"""Processes of a gloo group exit cleanly right after their last collective (aqlm.distributed.leave_process_group)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 8

# Each process broadcasts temporaries (``tensor.data``, as ZeroRedundancyOptimizer does) and drops the
# work handles, so that a gloo worker thread may be the last to hold them and need the GIL to free
# them after wait() returns, and then exits at once. The late import of torch.distributed.optim
# keeps the group alive past destroy_process_group, as in PV-Tuning's runs.
CHILD = """
import sys
import torch
import torch.distributed as dist
from aqlm.distributed import leave_process_group

rank, init = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method="file://" + init, rank=rank, world_size=2)
import torch.distributed.optim  # noqa: E402,F401


def work():
    tensors = [torch.full((64,), float(i)) for i in range(8)]
    for _ in range(3):
        handles = [dist.broadcast(t.data, src=i % 2, async_op=True) for i, t in enumerate(tensors)]
        for handle in handles:
            handle.wait()


work()
leave_process_group()
"""


def test_processes_leave_the_group_without_aborting(tmp_path):
    """Without the GIL handover one such process in five to ten aborts with SIGABRT ("terminate called
    without an active exception"); every one of 2 x ROUNDS must exit with status 0."""
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
                       OMP_NUM_THREADS="1")
    failures = []
    for round_index in range(ROUNDS):
        init = tmp_path / f"init{round_index}"
        processes = [subprocess.Popen([sys.executable, "-c", CHILD, str(rank), str(init)], env=environment,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
        try:
            for rank, process in enumerate(processes):
                _, stderr = process.communicate(timeout=120)
                if process.returncode != 0:
                    failures.append((round_index, rank, process.returncode, stderr[-500:]))
        finally:  # a process left waiting for a crashed peer
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    assert not failures, failures
