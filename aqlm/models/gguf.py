"""Load a GGUF checkpoint as an ordinary, saveable Hugging Face model.

Transformers can read GGUF files (it de-quantizes every tensor to floating point), but
the model it returns carries a GGUF ``quantization_config`` and refuses
``save_pretrained``. :func:`load_gguf` rebuilds a plain model from the same config and
weights so the result behaves like any other checkpoint.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
# Tokenizers read from GGUF get Transformers' "no limit" sentinel (about 1e30).
_UNSET_MODEL_MAX_LENGTH = int(1e29)


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file: it starts with {magic!r}, expected {GGUF_MAGIC!r}")


def load_gguf(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a GGUF file as a de-quantized, saveable causal LM and its tokenizer.

    The file is read by Transformers (``from_pretrained(..., gguf_file=...)``), then a
    fresh model is built with ``from_config`` from the same config minus its
    ``quantization_config`` and the de-quantized weights are copied in, so that
    ``save_pretrained`` works. Tied input/output embeddings stay tied. When the GGUF
    carries no context length for the tokenizer, ``tokenizer.model_max_length`` is set to
    the model's ``max_position_embeddings``.

    Note that the weights are the de-quantized values stored in the GGUF (for a Q4_1 file,
    4-bit blocks scaled back to floats), not the original unquantized checkpoint.

    Args:
        path: the ``.gguf`` file.
        dtype: parameter dtype of the returned model.

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file does not start with the GGUF magic bytes.
        RuntimeError: tied embeddings came out untied after the rebuild.
    """
    path = Path(path).resolve()
    _check_gguf_file(path)
    logger.info("loading GGUF %s", path)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = type(gguf_model.config).from_dict(config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    del gguf_model

    if getattr(config, "tie_word_embeddings", False):
        output = model.get_output_embeddings()
        if output is None or output.weight is not model.get_input_embeddings().weight:
            raise RuntimeError(f"{path}: tie_word_embeddings is set but the rebuilt model's embeddings are not tied")

    max_positions = getattr(config, "max_position_embeddings", None)
    if max_positions and tokenizer.model_max_length >= _UNSET_MODEL_MAX_LENGTH:
        tokenizer.model_max_length = max_positions
    model.eval()
    return model, tokenizer
