"""Size on disk of an AQLM checkpoint of a model, for a scheme and a storage dtype, without quantizing.

A checkpoint's size depends only on tensor shapes and dtypes, not on their values, so every block
linear is replaced by a QuantizedLinear of the scheme's shapes (codes zero, codebooks zero), saved
with ``save_quantized`` exactly as ``quantize`` saves, and the files are measured.

    python scripts/checkpoint_size.py --model smollm2-135m --scheme 2x8g8 --param-dtype float16
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from aqlm import AqlmScheme, QuantizedLinear, save_quantized
from aqlm.calibration import find_linears, get_blocks
from aqlm.models.real import REAL_MODELS, real_model_dir

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def checkpoint_bytes(model_dir: Path, scheme: AqlmScheme, storage_dtype: torch.dtype) -> int:
    """Bytes of ``model*.safetensors`` of ``model_dir`` quantized with ``scheme``, floats in ``storage_dtype``."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for block in get_blocks(model):
        for name, linear in find_linears(block).items():
            layer = QuantizedLinear(linear.in_features, linear.out_features, scheme.in_group_size, scheme.out_group_size,
                                    scheme.num_codebooks, scheme.nbits_per_codebook, bias=linear.bias is not None)
            for parameter in layer.parameters():
                parameter.data.zero_()
            block.set_submodule(name, layer)
    with tempfile.TemporaryDirectory() as directory:
        save_quantized(model, directory, storage_dtype=storage_dtype)
        return sum(path.stat().st_size for path in Path(directory).glob("model*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help=f"a model directory or one of {sorted(REAL_MODELS)}")
    parser.add_argument("--scheme", default="2x8g8")
    parser.add_argument("--param-dtype", choices=sorted(DTYPES), default="float16")
    args = parser.parse_args()
    model_dir = real_model_dir(args.model) if args.model in REAL_MODELS else Path(args.model)
    size = checkpoint_bytes(model_dir, AqlmScheme.parse(args.scheme), DTYPES[args.param_dtype])
    print(f"{args.model} {args.scheme} with {args.param_dtype} parameters: model.safetensors {size / 2**20:.1f} MiB "
          f"({size} bytes)")


if __name__ == "__main__":
    main()
