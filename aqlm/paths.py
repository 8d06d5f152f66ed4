"""Where the bundled data (stories260K, WikiText-2) and the on-disk cache live."""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "AQLM_SHARED_DATA"
CACHE_DIR_ENV = "AQLM_CACHE_DIR"

# Inside an installed wheel the data is copied next to the package (setup.py); in a checkout or an
# editable install it is the repository's data/ directory.
_BUNDLED_CANDIDATES = (
    Path(__file__).resolve().parent / "_bundled_data",
    Path(__file__).resolve().parents[1] / "data",
)


def data_dir() -> Path:
    """Return the directory holding the bundled data (``stories260K/``, ``wikitext-2/``).

    The environment variable ``AQLM_SHARED_DATA`` wins when set (returned as given, resolved,
    without checking that it exists). Otherwise the data shipped with the package is used: the
    repository's ``data/`` directory, or its copy inside an installed wheel.

    Raises:
        FileNotFoundError: no candidate exists; the message lists every path tried.
    """
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        return Path(override).expanduser().resolve()
    for candidate in _BUNDLED_CANDIDATES:
        if (candidate / "stories260K").is_dir():
            return candidate
    tried = ", ".join(str(c) for c in _BUNDLED_CANDIDATES)
    raise FileNotFoundError(
        f"aqlm's bundled data directory not found; tried: {tried}. Reinstall aqlm from a complete "
        f"checkout, or set {DATA_DIR_ENV} to a directory that holds stories260K/ and wikitext-2/."
    )


def data_file(*parts: str) -> Path:
    """A file of the bundled data, e.g. ``data_file("wikitext-2", "valid.txt")``.

    Raises:
        FileNotFoundError: the file does not exist; the message names it.
    """
    path = data_dir().joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"bundled data file {path} not found")
    return path


def cache_dir() -> Path:
    """Return the project's cache directory, creating it if needed.

    ``AQLM_CACHE_DIR`` when set, else ``~/.cache/aqlm``.
    """
    override = os.environ.get(CACHE_DIR_ENV)
    path = Path(override).expanduser() if override else Path.home() / ".cache" / "aqlm"
    path.mkdir(parents=True, exist_ok=True)
    return path.resolve()
