"""Small file helpers shared by the resumable jobs: atomic writes (a kill never leaves half a file) and digests."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` and a newline to ``path`` through a temporary file and an atomic rename."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text + "\n")
    os.replace(temporary, path)


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


def model_identity(model_dir: Path) -> dict:
    """What resume fingerprints (quantization and PV-Tuning alike) record of a model directory:
    the digests of its config.json and of every weight file, so changed weights are never resumed onto."""
    model_dir = Path(model_dir)
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {
        "config_sha256": file_sha256(model_dir / "config.json"),
        "weights_sha256": {p.name: file_sha256(p) for p in weights},
    }
