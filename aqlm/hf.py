"""Hugging Face Transformers integration: saving AQLM checkpoints and loading upstream ones right.

Transformers builds ``aqlm.QuantizedLinear`` for every ``nn.Linear`` of a checkpoint whose
``config.json`` has ``quantization_config.quant_method == "aqlm"``, except those listed in
``linear_weights_not_to_quantize``. AQLM checkpoints list *weight* names there (``lm_head.weight``)
while Transformers 5 matches *module* names (``lm_head``): stock loading then replaces the dense
``lm_head`` by an empty QuantizedLinear and the logits are garbage. Importing ``aqlm`` installs a
narrow fix: Transformers' AQLM integration module sees the list with a trailing ``.weight``
stripped from each entry. It is applied when that module is imported (or at once if it already
is), so it works whichever of ``aqlm`` and ``transformers`` is imported first.

The same mechanism makes loading strict: Transformers fills a tensor missing from a checkpoint
with whatever memory it allocated and only logs a warning, which for AQLM codes, codebooks or
scales means silently wrong logits. After loading, every QuantizedLinear tensor must have come
from the checkpoint, or ``from_pretrained`` raises a ValueError naming the missing tensors.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .fileio import make_readable
from .inference import QuantizedLinear

_INTEGRATION_MODULE = "transformers.integrations.aqlm"
_QUANTIZER_MODULE = "transformers.quantizers.quantizer_aqlm"
_PATCH_MARK = "_aqlm_accepts_weight_names"
_CHECK_MARK = "_aqlm_checks_loaded_tensors"


def _module_names(patterns: Optional[list]) -> Optional[list]:
    if patterns is None:
        return None
    return [p[: -len(".weight")] if isinstance(p, str) and p.endswith(".weight") else p for p in patterns]


def _patch_integration(module: Any) -> None:
    """Make ``module.should_convert_module`` accept weight names (``x.weight``) as module names."""
    original: Optional[Callable] = getattr(module, "should_convert_module", None)
    if original is None or getattr(original, _PATCH_MARK, False):
        return  # an older Transformers that matches weight names itself, or already patched

    def should_convert_module(full_name: str, patterns: Optional[list] = None) -> bool:
        return original(full_name, _module_names(patterns))

    setattr(should_convert_module, _PATCH_MARK, True)
    module.should_convert_module = should_convert_module


def check_loaded_tensors(model: nn.Module) -> None:
    """Raise ValueError if a QuantizedLinear tensor of ``model`` was not read from its checkpoint.

    Relies on the ``_is_hf_initialized`` flag that Transformers sets on every tensor it loads;
    a model in which no QuantizedLinear tensor carries the flag (loaded some other way) passes.
    """
    missing, flagged = [], False
    for name, module in model.named_modules():
        if not isinstance(module, QuantizedLinear):
            continue
        for tensor_name, tensor in module.named_parameters(recurse=False):
            if getattr(tensor, "_is_hf_initialized", False):
                flagged = True
            else:
                missing.append(f"{name}.{tensor_name}")
    if flagged and missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ValueError(f"the AQLM checkpoint lacks tensors that the model needs: {shown}")


def _patch_quantizer(module: Any) -> None:
    """Make the AQLM quantizer's ``postprocess_model`` refuse checkpoints with missing AQLM tensors."""
    quantizer = getattr(module, "AqlmHfQuantizer", None)
    original: Optional[Callable] = getattr(quantizer, "postprocess_model", None)
    if original is None or getattr(original, _CHECK_MARK, False):
        return

    def postprocess_model(self, model, **kwargs):
        check_loaded_tensors(model)
        return original(self, model, **kwargs)

    setattr(postprocess_model, _CHECK_MARK, True)
    quantizer.postprocess_model = postprocess_model


_PATCHES: dict[str, Callable[[Any], None]] = {
    _INTEGRATION_MODULE: _patch_integration,
    _QUANTIZER_MODULE: _patch_quantizer,
}


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader, patch: Callable[[Any], None]):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._patch(module)


class _IntegrationImportHook(importlib.abc.MetaPathFinder):
    """Patches Transformers' AQLM integration and quantizer modules right after each is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES or fullname in sys.modules:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader, _PATCHES[fullname])
        return spec


def install_transformers_compat() -> None:
    """Install the ``linear_weights_not_to_quantize`` fix and the missing-tensor check (idempotent;
    called by ``import aqlm``)."""
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
    if not any(isinstance(finder, _IntegrationImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, _IntegrationImportHook())


def quantization_config(model: nn.Module) -> dict:
    """The ``quantization_config`` dict for a model whose linear layers are (partly) QuantizedLinear.

    Every remaining ``nn.Linear`` is listed in ``linear_weights_not_to_quantize`` both by module
    name and by weight name, so the checkpoint loads right with any Transformers version.
    """
    schemes = {m.scheme for m in model.modules() if isinstance(m, QuantizedLinear)}
    if not schemes:
        raise ValueError("the model has no QuantizedLinear layers: quantize it before saving")
    if len(schemes) > 1:
        names = sorted(s.name for s in schemes)
        raise ValueError(f"a Hugging Face AQLM checkpoint has one scheme for all layers, got {names}")
    (scheme,) = schemes
    keep = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            keep += [name, f"{name}.weight"]
    return {
        "quant_method": "aqlm",
        "in_group_size": scheme.in_group_size,
        "out_group_size": scheme.out_group_size,
        "num_codebooks": scheme.num_codebooks,
        "nbits_per_codebook": scheme.nbits_per_codebook,
        "linear_weights_not_to_quantize": keep,
    }


def save_quantized(
    model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, storage_dtype: Optional[torch.dtype] = None
) -> Path:
    """Save a Transformers model with QuantizedLinear layers as a checkpoint that
    ``AutoModelForCausalLM.from_pretrained`` loads (safetensors + config with ``quantization_config``).

    Args:
        model: the model; it is not changed.
        out_dir: the checkpoint directory.
        tokenizer: saved beside the model when given.
        storage_dtype: store every floating-point tensor (embeddings, norms, codebooks, scales, ...)
            in this dtype, as upstream's float16 checkpoints do. ``config.json`` keeps the model's own
            dtype, so ``from_pretrained`` still builds the model in the dtype it was quantized in.
            None: store each tensor in its current dtype.
    """
    out_dir = Path(out_dir)
    config = quantization_config(model)
    model.config.quantization_config = config
    state_dict = None
    if storage_dtype is not None:
        # Tied tensors (an output head sharing the embedding) are stored once, as save_pretrained
        # stores them: a converted copy would no longer share memory and would be written twice.
        state_dict, seen = {}, set()
        for name, tensor in model.state_dict().items():
            key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype)
            if tensor.numel() and key in seen:
                continue
            seen.add(key)
            state_dict[name] = tensor.to(storage_dtype) if tensor.is_floating_point() else tensor
    model.save_pretrained(out_dir, safe_serialization=True, state_dict=state_dict)
    make_readable(out_dir.glob("model*.safetensors*"))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    # save_pretrained may drop or rewrite the dict form: make sure config.json carries it as given
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    if saved.get("quantization_config") != config:
        saved["quantization_config"] = config
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return out_dir


MODEL_KINDS = ("any", "dense", "aqlm")


def read_model_config(model_dir: str | os.PathLike, role: str = "model") -> dict:
    """The ``config.json`` of a Hugging Face model directory, as a dict.

    Raises:
        FileNotFoundError: the directory or its config.json is missing (the message starts with ``role``).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{role} directory {model_dir} does not exist")
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{role} directory {model_dir} has no config.json: not a Hugging Face model")
    return json.loads(config_path.read_text())


def check_model_kind(model_dir: str | os.PathLike, kind: str, role: str = "model") -> dict:
    """Read ``model_dir``'s config and check that it is a ``kind`` model ("any", "dense" or "aqlm"); returns the config.

    Raises:
        FileNotFoundError: see :func:`read_model_config`.
        ValueError: a quantized checkpoint where a dense one is expected, or not an AQLM checkpoint
            where one is expected, or an unknown ``kind``.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"kind must be one of {MODEL_KINDS}, got {kind!r}")
    config = read_model_config(model_dir, role)
    method = (config.get("quantization_config") or {}).get("quant_method")
    if kind == "dense" and config.get("quantization_config"):
        raise ValueError(f"{model_dir} is already quantized ({method}): a dense model is needed")
    if kind == "aqlm" and method != "aqlm":
        what = f"quantized with {method!r}" if method else "not quantized"
        raise ValueError(
            f"{model_dir} is {what}: an AQLM checkpoint is needed (quantization_config.quant_method 'aqlm'), "
            "e.g. from aqlm.quantize.quantize_model"
        )
    return config


def load_causal_lm(
    model_dir: str | os.PathLike,
    *,
    kind: str = "any",
    dtype: Optional[torch.dtype] = None,
    use_cache: Optional[bool] = None,
    role: str = "model",
) -> tuple[nn.Module, Any]:
    """Load a Hugging Face causal LM (dense or AQLM) in evaluation mode, and its tokenizer (None when it has none).

    This is the package's one model loader: the command line, quantization and PV-Tuning use it.

    Args:
        model_dir: the model directory.
        kind: "dense" refuses quantized checkpoints, "aqlm" requires an AQLM checkpoint that loads
            with at least one :class:`aqlm.QuantizedLinear`, "any" takes either.
        dtype: dtype of the float parameters (None: Transformers' default).
        use_cache: if given, set as ``model.config.use_cache``.
        role: how errors name the directory (e.g. "dense model").

    Raises:
        FileNotFoundError: the directory or its config.json is missing.
        ValueError: the checkpoint is not of ``kind``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_kind(model_dir, kind, role)
    options = {} if dtype is None else {"dtype": dtype}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **options).eval()
    if kind == "aqlm" and not any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError(f"{model_dir} loaded without any aqlm.QuantizedLinear layer: not an AQLM checkpoint")
    if use_cache is not None:
        model.config.use_cache = use_cache
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError, TypeError):
        tokenizer = None
    return model, tokenizer
