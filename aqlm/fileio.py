"""Small file helpers shared by the resumable jobs: atomic writes (a kill never leaves half a file) and digests."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` and a newline to ``path`` through a temporary file and an atomic rename."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text + "\n")
    os.replace(temporary, path)


def make_readable(paths: Iterable[Path]) -> None:
    """Give files the permissions a plain ``open(path, "w")`` would (0666 less the umask).

    Writers that go through a private temporary file (Transformers' ``save_pretrained`` does) leave
    0600 files that other users of a shared checkpoint cannot read.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in paths:
        os.chmod(path, 0o666 & ~umask)


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)`` through a temporary file and an atomic rename."""
    temporary = path.with_name(path.name + ".tmp")
    torch.save(obj, temporary)
    os.replace(temporary, path)


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokens_sha256(tokens: torch.Tensor) -> str:
    """Hex SHA-256 of a token tensor's values (dtype and layout as stored, on the CPU)."""
    return hashlib.sha256(tokens.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def check_output_dir(
    out_dir: Path, inputs: Mapping[str, Path], run_marker: Path, resume: bool, overwrite: bool
) -> None:
    """Refuse to write a job's output where it would damage what the user did not ask to replace.

    Writing is allowed into a missing or empty directory; into one holding an unfinished run of
    the same job (``run_marker`` exists) when ``resume``; and into any other directory only with
    ``overwrite``. The directory of an input model is refused even then.

    Raises:
        FileExistsError: ``out_dir`` is a file, or a non-empty directory that may not be written.
        ValueError: ``out_dir`` is one of ``inputs`` (a role name -> directory mapping).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output directory {out_dir} is a file, not a directory")
    for role, directory in inputs.items():
        if Path(directory).exists() and out_dir.resolve() == Path(directory).resolve():
            raise ValueError(f"output directory {out_dir} is the {role} model directory: choose another")
    entries = sorted(entry.name for entry in out_dir.iterdir()) if out_dir.is_dir() else []
    if not entries or overwrite or (resume and run_marker.exists()):
        return
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    if resume:
        raise FileExistsError(f"output directory {out_dir} holds no run to resume ({shown}); choose an empty directory")
    raise FileExistsError(
        f"output directory {out_dir} is not empty ({shown}): continue its run with --resume, "
        "write into it with --overwrite, or choose an empty directory"
    )


def model_identity(model_dir: Path) -> dict:
    """What resume fingerprints (quantization and PV-Tuning alike) record of a model directory:
    the digests of its config.json and of every weight file, so changed weights are never resumed onto."""
    model_dir = Path(model_dir)
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {
        "config_sha256": file_sha256(model_dir / "config.json"),
        "weights_sha256": {p.name: file_sha256(p) for p in weights},
    }
