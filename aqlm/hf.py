"""Hugging Face Transformers integration: saving AQLM checkpoints and loading upstream ones right.

Transformers builds ``aqlm.QuantizedLinear`` for every ``nn.Linear`` of a checkpoint whose
``config.json`` has ``quantization_config.quant_method == "aqlm"``, except those listed in
``linear_weights_not_to_quantize``. AQLM checkpoints list *weight* names there (``lm_head.weight``)
while Transformers 5 matches *module* names (``lm_head``): stock loading then replaces the dense
``lm_head`` by an empty QuantizedLinear and the logits are garbage. Importing ``aqlm`` installs a
narrow fix: Transformers' AQLM integration module sees the list with a trailing ``.weight``
stripped from each entry. It is applied when that module is imported (or at once if it already
is), so it works whichever of ``aqlm`` and ``transformers`` is imported first.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch.nn as nn

from .inference import QuantizedLinear

_INTEGRATION_MODULE = "transformers.integrations.aqlm"
_PATCH_MARK = "_aqlm_accepts_weight_names"


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


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _patch_integration(module)


class _IntegrationImportHook(importlib.abc.MetaPathFinder):
    """Patches Transformers' AQLM integration module right after it is first imported."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _INTEGRATION_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _PatchingLoader(spec.loader)
        return spec


def install_transformers_compat() -> None:
    """Install the ``linear_weights_not_to_quantize`` fix (idempotent; called by ``import aqlm``)."""
    if _INTEGRATION_MODULE in sys.modules:
        _patch_integration(sys.modules[_INTEGRATION_MODULE])
    elif not any(isinstance(finder, _IntegrationImportHook) for finder in sys.meta_path):
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


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None) -> Path:
    """Save a Transformers model with QuantizedLinear layers as a checkpoint that
    ``AutoModelForCausalLM.from_pretrained`` loads (safetensors + config with ``quantization_config``)."""
    out_dir = Path(out_dir)
    config = quantization_config(model)
    model.config.quantization_config = config
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    # save_pretrained may drop or rewrite the dict form: make sure config.json carries it as given
    config_path = out_dir / "config.json"
    saved = json.loads(config_path.read_text())
    if saved.get("quantization_config") != config:
        saved["quantization_config"] = config
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return out_dir
