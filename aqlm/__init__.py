"""AQLM: Additive Quantization of Language Models and PV-Tuning, with a C core for CPUs.

``from aqlm import QuantizedLinear`` is what Hugging Face Transformers' AQLM integration imports.
"""
import sys as _sys
from importlib import metadata as _metadata
from pathlib import Path as _Path

try:
    from . import _C
except ImportError:
    if any(_Path(__file__).parent.glob("_C.*")):
        raise  # the extension is there but refused to load (e.g. a bad AQLM_SIMD): its own message says why
    # a source tree whose extension was never built, e.g. the checkout after `pip install .`
    _message = (
        f"aqlm's C extension is not built in the source tree {_Path(__file__).parent}, which shadows any installed "
        "aqlm from this directory: build it in place with `pip install -e .`, or run from another directory"
    )
    if _sys.argv[:1] == ["-m"]:  # `python -m aqlm ...`: one line, no traceback
        print(f"error: {_message}", file=_sys.stderr)
        raise SystemExit(2) from None
    raise ImportError(_message) from None

from . import ops
from .format import AqlmScheme, dequantize_reference, pack_codes, unpack_codes
from .hf import install_transformers_compat, quantization_config, save_quantized
from .inference import QuantizedLinear
from .int8_head import Int8Linear, quantize_lm_head

try:
    __version__ = _metadata.version("aqlm")
except _metadata.PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "2.0.0"

install_transformers_compat()

__all__ = [
    "AqlmScheme",
    "Int8Linear",
    "QuantizedLinear",
    "dequantize_reference",
    "ops",
    "pack_codes",
    "quantization_config",
    "quantize_lm_head",
    "save_quantized",
    "unpack_codes",
]
