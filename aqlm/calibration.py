"""What layer-wise quantizers need from a decoder-only model: its blocks, their linears and inputs.

Supported are Llama-style decoders whose transformer blocks are ``model.model.layers`` (Llama,
Mistral, Qwen2, SmolLM, ...). The inputs of block 0 are captured by running the model's own
embedding path and stopping it at block 0, so whatever the model does before its first block
(embedding scaling, rotary tables, mask construction) is reproduced exactly. The keyword
arguments block 0 receives are captured from a batch-of-one call: they do not depend on the
tokens (no padding mask is passed) and their leading batch dimension is 1, so they broadcast over
any batch of windows of the same length and can be reused for every block.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from tqdm.auto import tqdm

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2")


class _StopForward(Exception):
    """Raised by the block-0 hook to stop the model's forward pass once the inputs are recorded."""


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """Return the transformer blocks ``model.model.layers`` of a Llama-style causal LM.

    Raises:
        ValueError: the model has no ``model.model.layers`` ModuleList.
    """
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"model_type {model_type!r} is not supported: expected a decoder with transformer blocks at "
            f"model.model.layers, as in the {', '.join(SUPPORTED_FAMILIES)} families"
        )
    return layers


def find_linears(module: nn.Module) -> Dict[str, nn.Linear]:
    """All ``nn.Linear`` submodules of ``module`` by qualified name relative to it (``"self_attn.q_proj"``)."""
    return {name: child for name, child in module.named_modules() if isinstance(child, nn.Linear)}


def _model_device(model: nn.Module) -> torch.device:
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def _check_windows(windows: torch.Tensor) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.shape[0] == 0:
        shape = tuple(windows.shape) if isinstance(windows, torch.Tensor) else type(windows).__name__
        raise ValueError(f"windows must be a non-empty [n, seqlen] tensor of token ids, got {shape}")
    if windows.is_floating_point():
        raise TypeError(f"windows must hold integer token ids, got dtype {windows.dtype}")


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_uniform_layers(model: nn.Module) -> None:
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if layer_types is not None and len(set(layer_types)) > 1:
        raise ValueError(
            f"blocks of different attention types {sorted(set(layer_types))} get different keyword "
            "arguments; capturing them once at block 0 is only valid when all blocks are alike"
        )


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(item) for item in value)
    return value


def capture_block_inputs(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 1, progress: bool = True
) -> Tuple[torch.Tensor, Dict[str, Any]]:
    """Record the hidden states entering block 0, and the keyword arguments block 0 receives.

    Args:
        model: a causal LM accepted by :func:`get_blocks`.
        windows: ``[n, seqlen]`` token ids.
        batch_size: windows per forward call.
        progress: show a progress bar.

    Returns:
        ``(inputs, block_kwargs)``: ``inputs`` is ``[n, seqlen, hidden]`` in the dtype of the
        hidden states (the model dtype), on the model's device; ``block_kwargs`` holds what a block
        must be called with besides the hidden states (for Transformers 5 Llama: ``attention_mask``,
        ``position_ids``, ``position_embeddings``; ``cache=None`` (``past_key_values=None`` before
        Transformers 5.2x) and
        ``use_cache=False``). They come from a batch-of-one call and broadcast over any batch of
        windows of this ``seqlen``, for every block.
    """
    _check_windows(windows)
    _check_batch_size(batch_size)
    _check_uniform_layers(model)
    blocks = get_blocks(model)
    device = _model_device(model)
    windows = windows.to(device=device, dtype=torch.long)
    recorded: Dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        recorded["hidden"] = args[0] if args else kwargs["hidden_states"]
        recorded["kwargs"] = {key: value for key, value in kwargs.items() if key != "hidden_states"}
        raise _StopForward

    def embed(batch: torch.Tensor) -> None:
        try:
            model(input_ids=batch, use_cache=False)
        except _StopForward:
            return
        raise RuntimeError("the model's forward pass never reached block 0")

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    inputs: Optional[torch.Tensor] = None
    try:
        with torch.no_grad():
            embed(windows[:1])
            block_kwargs = {key: _detach(value) for key, value in recorded["kwargs"].items()}
            # No cache in calibration; Transformers >= 5.2x names the argument ``cache``, older ones
            # ``past_key_values`` (setting the old name beside the new one draws a FutureWarning).
            block_kwargs["cache" if "cache" in block_kwargs else "past_key_values"] = None
            block_kwargs["use_cache"] = False
            starts = range(0, windows.shape[0], batch_size)
            for start in tqdm(starts, desc="block 0 inputs", disable=not progress, leave=False):
                embed(windows[start : start + batch_size])
                hidden = recorded["hidden"]
                if inputs is None:
                    inputs = torch.empty(
                        (windows.shape[0],) + tuple(hidden.shape[1:]), dtype=hidden.dtype, device=hidden.device
                    )
                inputs[start : start + hidden.shape[0]] = hidden
    finally:
        handle.remove()
    return inputs, block_kwargs


def run_block(
    block: nn.Module,
    inputs: torch.Tensor,
    block_kwargs: Dict[str, Any],
    batch_size: int = 1,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run ``block`` over ``inputs`` (``[n, seqlen, hidden]``) in batches of windows, without gradients.

    Blocks that return a tuple (older Transformers) contribute its first element. ``out`` may be
    a preallocated tensor of the inputs' shape, including ``inputs`` itself (each batch is read
    before it is overwritten); otherwise a new tensor is returned.
    """
    _check_batch_size(batch_size)
    if out is None:
        out = torch.empty_like(inputs)
    elif out.shape != inputs.shape:
        raise ValueError(f"out has shape {tuple(out.shape)}, expected the inputs' shape {tuple(inputs.shape)}")
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            result = block(inputs[start : start + batch_size], **block_kwargs)
            if isinstance(result, (tuple, list)):
                result = result[0]
            out[start : start + batch_size] = result
    return out
