"""Wall time of a quantization run, split into its phases.

One :class:`PhaseTimer` is passed down through the model, block and layer code; each phase adds
the wall time of the code inside ``with timer.phase(name):``. Phases do not nest: time spent inside
one phase is counted once, in that phase. The process's CPU time (all threads) is kept alongside:
on a machine shared with other jobs it varies much less than wall time.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

PHASES = (
    "calibration",  # forward passes of the blocks: inputs, dense targets, outputs for the next block
    "xtx",  # X^T X collection (its forward passes included)
    "kmeans_init",  # scales and residual k-means of every layer
    "beam_search",  # code search, with the starting gradient (one dequantize and one product with X^T X)
    "codebook_update",  # codebook and scale updates (Adam or least squares)
    "finetune",  # block fine-tuning
    "output_check",  # layer errors and the block output error
    "saving",  # progress files and the final checkpoint
)


class PhaseTimer:
    """Seconds per phase (see :data:`PHASES`), accumulated over a run."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.cpu_seconds: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to phase ``name``."""
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}: expected one of {', '.join(PHASES)}")
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start
            self.cpu_seconds[name] += time.process_time() - cpu_start

    def add(self, seconds: dict[str, float], cpu_seconds: Optional[dict[str, float]] = None) -> None:
        """Add another timer's :meth:`as_dict` and :meth:`cpu_dict` (e.g. one block's)."""
        for target, values in ((self.seconds, seconds), (self.cpu_seconds, cpu_seconds or {})):
            for name, value in values.items():
                if name not in target:
                    raise ValueError(f"unknown phase {name!r}: expected one of {', '.join(PHASES)}")
                target[name] += float(value)

    def as_dict(self) -> dict[str, float]:
        """Wall seconds per phase, in :data:`PHASES` order."""
        return dict(self.seconds)

    def cpu_dict(self) -> dict[str, float]:
        """CPU seconds of the process (all threads) per phase, in :data:`PHASES` order."""
        return dict(self.cpu_seconds)

    def total(self) -> float:
        """Sum over all phases."""
        return sum(self.seconds.values())

    def summary(self) -> str:
        """One line: ``calibration 1.2 s, xtx 0.3 s, ...``."""
        return ", ".join(f"{name} {value:.1f} s" for name, value in self.seconds.items())


@contextmanager
def maybe_phase(timer: Optional[PhaseTimer], name: str) -> Iterator[None]:
    """``timer.phase(name)``, or nothing when ``timer`` is None."""
    if timer is None:
        yield
        return
    with timer.phase(name):
        yield
