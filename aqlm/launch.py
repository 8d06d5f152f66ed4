"""``--nproc N``: re-run this ``python -m aqlm`` command as N ``torchrun`` processes on this machine."""
from __future__ import annotations

import subprocess
import sys
from typing import Mapping, Optional, Sequence


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without its ``--nproc N`` / ``--nproc=N`` options."""
    kept: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc":
            skip = True
        elif not item.startswith("--nproc="):
            kept.append(item)
    return kept


def check_nproc(nproc: Optional[int], environ: Mapping[str, str]) -> int:
    """The number of processes ``--nproc`` asks for (1 when not given).

    Raises:
        ValueError: ``nproc`` < 1, or ``--nproc`` inside a run already started by torchrun.
    """
    if nproc is None:
        return 1
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if "WORLD_SIZE" in environ:
        raise ValueError(
            f"--nproc {nproc} given inside a distributed launch (WORLD_SIZE={environ['WORLD_SIZE']}): "
            "under torchrun, set the processes with torchrun's --nproc-per-node and drop --nproc"
        )
    return nproc


def launch_workers(nproc: int, argv: Sequence[str]) -> int:
    """Run ``python -m aqlm <argv less --nproc>`` as ``nproc`` processes of ``torch.distributed.run --standalone``.

    Returns 0, or 1 after a one-line message on stderr when a process failed (the failing
    process's own error is printed above it, by that process and by torchrun).
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "aqlm", *without_nproc(argv)]
    status = subprocess.run(command).returncode
    if status != 0:
        command_name = next(iter(argv), "aqlm")
        print(f"error: the {nproc}-process {command_name} run failed (torchrun exit status {status}); "
              "the failing process's error is printed above", file=sys.stderr)
        return 1
    return 0
