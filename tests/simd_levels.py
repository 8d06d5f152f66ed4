"""SIMD levels for tests of the C core: every level is a parameter, unsupported ones are skipped."""
from __future__ import annotations

import pytest

from aqlm import _C

ORDER = ("scalar", "avx2", "avx512")
SUPPORTED = _C.simd_supported()


def is_supported(level: str) -> bool:
    """Whether this CPU, its OS and this build can run ``level``."""
    return ORDER.index(level) <= ORDER.index(SUPPORTED)


def simd_params() -> list:
    """One pytest parameter per level; levels above what this machine supports are skipped."""
    return [
        pytest.param(
            level,
            id=level,
            marks=pytest.mark.skipif(
                not is_supported(level),
                reason=f"simd={level!r} not supported here: this CPU/OS/build supports up to {SUPPORTED!r}",
            ),
        )
        for level in ORDER
    ]


def supported_levels() -> list[str]:
    """The levels this machine can run, lowest first."""
    return [level for level in ORDER if is_supported(level)]
