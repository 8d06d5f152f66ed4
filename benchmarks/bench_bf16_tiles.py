"""Bfloat16 activations (a bfloat16 model's prompt and batches): the bfloat16 tile kernel ("bf16",
AMX or AVX-512 BF16) against the other CPU kernels that apply and dense ``F.linear`` in bfloat16,
forced side by side in one process through ``aqlm.ops.quantized_matmul_cpu`` (the eager layer's
path), calls interleaved, medians in ms. Ratios are dense bf16 time / kernel time.

    python benchmarks/bench_bf16_tiles.py [--threads 2] [--tokens 4 16 64 128 512] [--schemes 1x16g8 2x8g8]
    AQLM_AMX=0 python benchmarks/bench_bf16_tiles.py ...   # the AVX-512 BF16 kernel on an AMX CPU

Codebooks and scales are bfloat16, as in a bfloat16 model (read in place by the tiles).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import aqlm
from aqlm import _C, ops
from bench_few_tokens import random_weight
from bench_matmul import cpu_flags

SCHEMES = ["1x16g8", "2x8g8"]
TOKENS = [4, 16, 64, 128, 512]


def bfloat16_weight(out_features: int, in_features: int, scheme: aqlm.AqlmScheme):
    """bench_few_tokens' random weight with bfloat16 codebooks and scales, as in a bfloat16 model."""
    codes, codebooks, scales = random_weight(out_features, in_features, scheme)
    return codes, codebooks.bfloat16(), scales.bfloat16()


def kernels_for(tokens: int, scheme: aqlm.AqlmScheme) -> list:
    """The bf16 tiles, then the other kernels worth comparing at this token count."""
    kernels = ["bf16"]
    if tokens <= ops.FEW_TOKENS:
        kernels += ["lutw"] if scheme.nbits_per_codebook <= 8 else ["decode"]
    return kernels + ["dequantize"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--tokens", type=int, nargs="+", default=TOKENS)
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    parser.add_argument("--shapes", nargs="+", default=["4096x4096"], help="OUTxIN")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"cpu: {cpu_flags()}")
    print(f"threads={args.threads}; bfloat16 tile kernel here: {_C.bf16_kernel()}")
    if _C.bf16_kernel() == "scalar":
        print("note: this CPU has neither AMX-BF16 nor AVX-512 BF16: 'bf16' runs the scalar reference")
    print(f"{'shape':>10} {'scheme':>7} {'tokens':>6} | " + " | ".join(["kernel ms (x dense bf16)"] * 3) + " | dense bf16 ms")
    for shape in args.shapes:
        out_features, in_features = (int(v) for v in shape.split("x"))
        for name in args.schemes:
            scheme = aqlm.AqlmScheme.parse(name)
            codes, codebooks, scales = bfloat16_weight(out_features, in_features, scheme)
            dense = ops.dequantize_reference(codes, codebooks, scales).reshape(out_features, in_features).bfloat16()
            for tokens in args.tokens:
                x = torch.randn(tokens, in_features).bfloat16()
                calls = {k: (lambda k=k: ops.quantized_matmul_cpu(x, codes, codebooks, scales, None, kernel=k))
                         for k in kernels_for(tokens, scheme)}
                calls["dense bf16"] = lambda: F.linear(x, dense)
                times = {k: [] for k in calls}
                for call in calls.values():
                    call()
                for _ in range(args.repeat):
                    for k, call in calls.items():
                        start = time.perf_counter()
                        call()
                        times[k].append(time.perf_counter() - start)
                ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                cells = [f"{k} {ms[k]:8.2f} ({ms['dense bf16'] / ms[k]:4.2f}x)" for k in calls if k != "dense bf16"]
                print(f"{shape:>10} {name:>7} {tokens:>6} | " + " | ".join(cells) + f" | {ms['dense bf16']:.2f}")


if __name__ == "__main__":
    main()
