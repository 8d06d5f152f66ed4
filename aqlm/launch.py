"""``--nproc N``: re-run this ``python -m aqlm`` command as N ``torchrun`` processes on this machine."""
from __future__ import annotations

import subprocess
import sys
from typing import Sequence


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
