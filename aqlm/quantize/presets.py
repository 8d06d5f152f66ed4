"""Named sets of ``quantize`` options (``--preset NAME``).

A preset changes only the options left at their defaults, whatever their order on the command
line: ``--preset cpu-fast --nsamples 64`` uses 64 calibration windows and the preset's other values.
"""
from __future__ import annotations

import argparse

from ..ops import cpu_has_fast_bf16

# bfloat16 products pay only where the CPU multiplies bfloat16 natively (AVX512-BF16, AMX);
# elsewhere torch emulates them and float32 is faster. Processes of one distributed run must
# agree: on machines of different kinds, give --forward-dtype and --finetune-dtype explicitly.
FAST_PRODUCT_DTYPE = "bfloat16" if cpu_has_fast_bf16() else "float32"

PRESETS: dict[str, dict[str, object]] = {
    # The README's SmolLM2 settings for 2 CPU cores: 32 windows of 512 tokens, 4 rounds of
    # least-squares codebook updates (at most 20 preconditioned conjugate-gradient steps, ending
    # once a step gains less than 0.03% of the error) and beam search, one fine-tuning epoch,
    # bfloat16 products in fine-tuning and the blocks' forward passes where the CPU has them
    # (X^T X and every parameter float32), and k-means as faiss runs it (25 iterations on at most 256 points per
    # centroid).
    "cpu-fast": {
        "nsamples": 32,
        "seqlen": 512,
        "max_epochs": 4,
        "steps_per_epoch": 20,
        "codebook_update": "lstsq",
        "lstsq_tolerance": 3e-4,
        "init_max_iter": 25,
        "init_max_points_per_centroid": 256,
        "finetune_max_epochs": 1,
        "finetune_dtype": FAST_PRODUCT_DTYPE,
        "forward_dtype": FAST_PRODUCT_DTYPE,
    },
}


class PresetAction(argparse.Action):
    """``--preset NAME``: sets every option of the preset that still holds its parser default."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        for dest, value in PRESETS[values].items():
            if getattr(namespace, dest) == parser.get_default(dest):
                setattr(namespace, dest, value)
        setattr(namespace, self.dest, values)


def add_preset_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--preset`` (choices: :data:`PRESETS`) to a ``quantize`` parser."""
    described = "; ".join(
        f"{name}: " + ", ".join(f"--{dest.replace('_', '-')} {value}" for dest, value in options.items())
        for name, options in PRESETS.items()
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), action=PresetAction, default=None,
                        help=f"named settings for the options left at their defaults ({described})")
