"""Model loaders (llama2.c ``.bin``, GGUF) and the project's cached real models."""

from aqlm.models.gguf import load_gguf
from aqlm.models.llama2c import load_llama2c
from aqlm.models.real import (
    RealModelUnavailable,
    real_model_dir,
    smollm2_dir,
    stories260k_dir,
)

__all__ = [
    "RealModelUnavailable",
    "load_gguf",
    "load_llama2c",
    "real_model_dir",
    "smollm2_dir",
    "stories260k_dir",
]
