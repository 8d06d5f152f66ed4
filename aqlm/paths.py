"""Where the project's shared test assets and its on-disk cache live."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA_ENV = "AQLM_SHARED_DATA"
CACHE_DIR_ENV = "AQLM_CACHE_DIR"


def shared_data_dir() -> Path:
    """Return the directory holding the shared, read-only test assets.

    The environment variable ``AQLM_SHARED_DATA`` wins when set (it is returned as
    given, resolved, without checking that it exists). Otherwise the first existing
    directory among ``<cwd>/../shared/data`` and ``<repository root>/../shared/data``
    is returned.

    Raises:
        FileNotFoundError: no candidate exists; the message lists every path tried.
    """
    override = os.environ.get(SHARED_DATA_ENV)
    if override:
        return Path(override).expanduser().resolve()
    candidates = [
        (Path.cwd() / "../shared/data").resolve(),
        (Path(__file__).resolve().parents[1] / "../shared/data").resolve(),
    ]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"shared data directory not found; tried: {tried}. "
        f"Set {SHARED_DATA_ENV} to the directory that holds stories260K/ and wikitext-2/."
    )


def cache_dir() -> Path:
    """Return the project's cache directory, creating it if needed.

    ``AQLM_CACHE_DIR`` when set, else ``~/.cache/aqlm``.
    """
    override = os.environ.get(CACHE_DIR_ENV)
    path = Path(override).expanduser() if override else Path.home() / ".cache" / "aqlm"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
