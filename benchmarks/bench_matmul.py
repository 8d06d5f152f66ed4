"""QuantizedLinear forward vs dense torch matmul at Llama-2-7B shapes, measured in one run.

For each shape and scheme, batch 1 and 16: the time of ``QuantizedLinear`` (the public forward,
torch op dispatch included), of ``F.linear`` in float32 and in bfloat16, their ratios, and the
fraction of the memory roofline reached: bytes the kernel must read (codes, codebooks, scales,
activations) over the read bandwidth measured in the same run, divided by the measured time.

    python benchmarks/bench_matmul.py [--threads 2] [--repeat 30] [--shapes 4096x4096 ...]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import aqlm
from aqlm import QuantizedLinear, pack_codes

SHAPES = ["4096x4096", "11008x4096", "4096x11008"]  # out x in
SCHEMES = ["2x8g8", "1x8g8", "8x8g8", "1x16g8"]


def measure(fn, repeat: int) -> float:
    """Median wall time of fn() in seconds after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(repeat: int) -> float:
    """Bytes per second of a large float32 reduction (256 MiB, far beyond the caches)."""
    data = torch.randn(64 * 2**20)
    seconds = measure(lambda: data.sum(), repeat)
    return data.numel() * 4 / seconds


def random_layer(out_features: int, in_features: int, scheme: aqlm.AqlmScheme, param_dtype: torch.dtype) -> QuantizedLinear:
    generator = torch.Generator().manual_seed(0)
    num_out_groups, num_in_groups = out_features // scheme.out_group_size, in_features // scheme.in_group_size
    codes = torch.randint(0, scheme.codebook_size, (num_out_groups, num_in_groups, scheme.num_codebooks), generator=generator)
    codebooks = torch.randn(scheme.num_codebooks, scheme.codebook_size, scheme.out_group_size, scheme.in_group_size, generator=generator)
    scales = torch.rand(num_out_groups, 1, 1, 1, generator=generator) * 0.02
    return QuantizedLinear.from_parts(
        pack_codes(codes, scheme.nbits_per_codebook), (codebooks / scheme.num_codebooks).to(param_dtype), scales.to(param_dtype)
    )


def bytes_read(layer: QuantizedLinear, batch: int) -> int:
    """What one forward must read at least: codes, codebooks, scales and the activations."""
    scheme = layer.scheme
    code_bytes = layer.codes.numel() * scheme.nbits_per_codebook / 8
    param_bytes = (layer.codebooks.numel() + layer.scales.numel()) * layer.codebooks.element_size()
    return int(code_bytes + param_bytes + batch * layer.in_features * 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--param-dtype", choices=["float16", "float32", "bfloat16"], default="float16",
                        help="codebook/scale dtype (upstream checkpoints store float16)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    param_dtype = getattr(torch, args.param_dtype)
    bandwidth = read_bandwidth(args.repeat)
    print(f"aqlm {aqlm.__version__}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"SIMD {aqlm._C.simd_default()}, {args.threads} threads, codebooks {args.param_dtype}, activations float32")
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s; times are medians of {args.repeat} runs\n")
    header = (f"{'shape':>11} {'scheme':>7} {'batch':>5} | {'aqlm ms':>8} {'fp32 ms':>8} {'bf16 ms':>8} | "
              f"{'vs fp32':>7} {'vs bf16':>7} | {'roofline':>8}")
    print(header)
    print("-" * len(header))
    for shape in args.shapes:
        out_features, in_features = map(int, shape.split("x"))
        dense = torch.randn(out_features, in_features) * 0.02
        dense_bf16 = dense.bfloat16()
        for name in args.schemes:
            scheme = aqlm.AqlmScheme.parse(name)
            layer = random_layer(out_features, in_features, scheme, param_dtype)
            for batch in args.batches:
                x = torch.randn(batch, in_features)
                x_bf16 = x.bfloat16()
                with torch.no_grad():
                    ours = measure(lambda: layer(x), args.repeat)
                    fp32 = measure(lambda: F.linear(x, dense), args.repeat)
                    bf16 = measure(lambda: F.linear(x_bf16, dense_bf16), args.repeat)
                roofline = bytes_read(layer, batch) / bandwidth / ours
                print(f"{shape:>11} {name:>7} {batch:>5} | {ours * 1e3:8.3f} {fp32 * 1e3:8.3f} {bf16 * 1e3:8.3f} | "
                      f"{fp32 / ours:6.2f}x {bf16 / ours:6.2f}x | {roofline:7.1%}")
        print()


if __name__ == "__main__":
    main()
