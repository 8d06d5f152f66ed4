"""Thread teams in tests of the C core: by default the core runs jobs below ~256k elementary
operations on one thread, so test-sized problems would never exercise the parallel code."""
from __future__ import annotations

from typing import Iterator

import pytest

from aqlm import _C

THREADS = 2


@pytest.fixture
def always_parallel() -> Iterator[int]:
    """Lower the core's parallel-work threshold to 0 for the test (restored afterwards), so every
    call asking for several threads gets them; checks OpenMP really gives a team of THREADS.
    Yields THREADS."""
    team = _C.parallel_team_size(THREADS)
    assert team == THREADS, f"OpenMP gives {team} thread(s) for num_threads={THREADS} (OMP_THREAD_LIMIT/OMP_DYNAMIC?)"
    previous = _C.min_parallel_work()
    _C.set_min_parallel_work(0)
    try:
        yield THREADS
    finally:
        _C.set_min_parallel_work(previous)
