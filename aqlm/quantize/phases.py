"""Wall time of a quantization run, split into its phases.

One :class:`PhaseTimer` is passed down through the model, block and layer code; each phase adds
the wall time of the code inside ``with timer.phase(name):``. Phases do not nest: time spent inside
one phase is counted once, in that phase.
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

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Add the wall time of the ``with`` body to phase ``name``."""
        if name not in self.seconds:
            raise ValueError(f"unknown phase {name!r}: expected one of {', '.join(PHASES)}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def add(self, seconds: dict[str, float]) -> None:
        """Add another timer's :meth:`as_dict` (e.g. one block's)."""
        for name, value in seconds.items():
            if name not in self.seconds:
                raise ValueError(f"unknown phase {name!r}: expected one of {', '.join(PHASES)}")
            self.seconds[name] += float(value)

    def as_dict(self) -> dict[str, float]:
        """Seconds per phase, in :data:`PHASES` order."""
        return dict(self.seconds)

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
