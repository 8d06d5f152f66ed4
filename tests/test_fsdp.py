"""QuantizedLinear under FSDP2 (``fully_shard``) on the CPU: 2 gloo processes train as 1 process does.

FSDP2 frees each unsharded weight after its forward by resizing the storage to 0; the CPU path
must leave that storage resizable (``Tensor.numpy()`` does not) and must notice the weights it
cached being freed, refilled and updated. tests/fsdp_worker.py runs the steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def run_worker(out: Path, nproc: int) -> dict:
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    environment["AQLM_KERNEL_CALIBRATION"] = "0"  # the fixed rules: no timing runs in the test
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                     "--nproc-per-node", str(nproc)]
    result = subprocess.run([*launcher, str(HERE / "fsdp_worker.py"), str(out)], env=environment,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    return run_worker(root / "one.json", 1), run_worker(root / "two.json", 2)


def test_two_sharded_processes_train_as_one(runs):
    one, two = runs
    assert (one["world"], two["world"]) == (1, 2)
    assert one["moved"] > 1e-2  # the codebooks really trained: a difference below would show
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    assert two["evaluations"] == pytest.approx(one["evaluations"], rel=1e-5)
    for run in (one, two):  # the cached plan follows every update: the same loss as the uncached op
        assert run["evaluations"] == pytest.approx(run["op_evaluations"], rel=1e-6)
    for name, values in one["weights"].items():
        worst = max(abs(a - b) for a, b in zip(values, two["weights"][name]))
        assert worst < 1e-4, f"{name}: {worst}"
