"""QuantizedLinear forward vs dense torch matmul at Llama-2-7B shapes, measured in one run.

For each SIMD level (each in its own process, forced with AQLM_SIMD), shape and scheme, batch 1
and 16: the time of ``QuantizedLinear`` (the public forward, torch op dispatch included), of
``F.linear`` in float32 and in bfloat16 measured in the same process, interleaved, their ratios,
the CPU kernel used, and the fraction of the memory roofline reached: bytes the kernel must read
(codes, codebooks, scales, activations) over the read bandwidth measured in the same run,
divided by the measured time. Times are medians; on a shared machine compare the ratios.

Interleaving puts each AQLM call right after a dense product that has flushed the caches,
including the Python and torch state around the call (a 4096x4096 float32 weight is 64 MiB). The
"model" columns call, round robin, enough distinct weights of each kind to span 96 MiB (well past
the last-level cache): every call finds its own weight evicted by the others, while the code
around it stays warm, as in the forward of a model of many layers; fp32 and bf16 dense are
measured the same way. The "bound" column is the C kernel alone, as ``aqlm.decode.LlamaDecoder``
calls it (``aqlm.ops.bound_linear_cpu``: no Python around the kernel), called back to back: what
the kernel can do when nothing else competes for the caches.

    python benchmarks/bench_matmul.py [--threads 2] [--repeat 30] [--shapes 4096x4096 ...] [--levels avx512 avx2]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import aqlm
from aqlm import QuantizedLinear, pack_codes

SHAPES = ["4096x4096"]  # out x in; Llama-2-7B's MLP shapes are 11008x4096 and 4096x11008
SCHEMES = ["2x8g8", "1x16g8", "8x8g8", "4x4g8"]
TARGETS = {"2x8g8": 10.0, "1x16g8": 4.0, "8x8g8": 1.0, "4x4g8": 10.0}  # batch 1, times fp32 dense (issue 13)
MODEL_BYTES = 96 << 20  # weights the "model" columns cycle through: beyond any last-level cache seen here (32 MiB)
CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512vbmi", "avx512_bf16", "amx_bf16")


def measure(fn, repeat: int) -> float:
    """Median wall time of fn() in seconds after warm-up."""
    return measure_interleaved({"fn": fn}, repeat)["fn"]


def measure_interleaved(fns: dict, repeat: int) -> dict:
    """Median wall time of each function, calls interleaved so that load changes hit all alike."""
    return measure_round_robin({name: [fn] for name, fn in fns.items()}, repeat, warmup=3)


def measure_round_robin(sets: dict, repeat: int, warmup: int = 1) -> dict:
    """For each name, the median over ``repeat`` rounds of the mean time per call when its
    functions (each on its own weight) are called in turn, after ``warmup`` untimed rounds;
    rounds of the sets interleaved, so that load changes hit all alike."""
    for fns in sets.values():
        for _ in range(warmup):
            for fn in fns:
                fn()
    times = {name: [] for name in sets}
    for _ in range(repeat):
        for name, fns in sets.items():
            start = time.perf_counter()
            for fn in fns:
                fn()
            times[name].append((time.perf_counter() - start) / len(fns))
    return {name: statistics.median(values) for name, values in times.items()}


def verdict(met: bool) -> str:
    """How the target column names a target met or missed."""
    return "met" if met else "MISSED"


def copies_spanning(bytes_each: int) -> int:
    """How many distinct weights of ``bytes_each`` bytes span MODEL_BYTES (at least 2)."""
    return max(2, -(-MODEL_BYTES // bytes_each))


def cpu_flags() -> str:
    """The CPU model and the vector-extension flags that matter here (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as file:
            info = file.read()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    return f"{model}; flags: {' '.join(f for f in CPU_FLAGS if f in flags)}"


def read_bandwidth(repeat: int) -> float:
    """Bytes per second of a large float32 reduction (256 MiB, far beyond the caches)."""
    data = torch.randn(64 * 2**20)
    seconds = measure(lambda: data.sum(), repeat)
    return data.numel() * 4 / seconds


def random_layer(out_features: int, in_features: int, scheme: aqlm.AqlmScheme, param_dtype: torch.dtype,
                 seed: int = 0) -> QuantizedLinear:
    """A layer of random codes, codebooks and scales in ``scheme`` (the same for the same seed)."""
    generator = torch.Generator().manual_seed(seed)
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


def run_level(args) -> None:
    """One process, one SIMD level (AQLM_SIMD was set before aqlm was imported)."""
    torch.set_num_threads(args.threads)
    param_dtype = getattr(torch, args.param_dtype)
    bandwidth = read_bandwidth(args.repeat)
    level = aqlm._C.simd_default()
    print(f"SIMD {level} (quantized-table kernels: {aqlm._C.lutq_kernel()}), {args.threads} threads, "
          f"codebooks {args.param_dtype}, activations float32, "
          f"{'exact tables only' if aqlm.ops.exact_lut_requested() else 'quantized tables on'}"
          f"{', bf16 dequantization on' if aqlm.ops.bf16_dequantize_requested() else ''}")
    print(f"measured read bandwidth: {bandwidth / 1e9:.1f} GB/s; times are medians of {args.repeat} interleaved runs\n")
    header = (f"{'shape':>11} {'scheme':>7} {'batch':>5} {'kernel':>15} | {'aqlm ms':>8} {'fp32 ms':>8} {'bf16 ms':>8} | "
              f"{'vs fp32':>7} {'vs bf16':>7} {'vs best':>7} | {'roofline':>8} | {'model ms':>8} {'vs fp32':>7} "
              f"{'vs bf16':>7} | {'bound ms':>8} {'vs fp32':>7} {'vs bf16':>7} | target (interleaved / model)")
    print(header)
    print("-" * len(header))
    for shape in args.shapes:
        out_features, in_features = map(int, shape.split("x"))
        denses = [torch.randn(out_features, in_features) * 0.02 for _ in range(copies_spanning(out_features * in_features * 4))]
        denses_bf16 = [d.bfloat16() for d in denses[:copies_spanning(out_features * in_features * 2)]]
        dense, dense_bf16 = denses[0], denses_bf16[0]
        for name in args.schemes:
            scheme = aqlm.AqlmScheme.parse(name)
            layer = random_layer(out_features, in_features, scheme, param_dtype)
            layers = [layer] + [random_layer(out_features, in_features, scheme, param_dtype, seed)
                                for seed in range(1, copies_spanning(bytes_read(layer, 0)))]
            for batch in args.batches:
                x = torch.randn(batch, in_features)
                x_bf16 = x.bfloat16()
                kernel = aqlm.ops.cpu_kernel_for(x, layer.codes, layer.codebooks, layer.scales, layer.bias)
                with torch.no_grad():
                    times = measure_interleaved(
                        {"aqlm": lambda: layer(x), "fp32": lambda: F.linear(x, dense), "bf16": lambda: F.linear(x_bf16, dense_bf16)},
                        args.repeat,
                    )
                    model = measure_round_robin(
                        {"aqlm": [lambda lay=lay: lay(x) for lay in layers],
                         "fp32": [lambda w=w: F.linear(x, w) for w in denses],
                         "bf16": [lambda w=w: F.linear(x_bf16, w) for w in denses_bf16]},
                        args.repeat,
                    )
                ours, fp32, bf16 = times["aqlm"], times["fp32"], times["bf16"]
                out = torch.empty(batch, out_features)
                bound = measure(aqlm.ops.bound_linear_cpu(x, out, layer.codes, layer.codebooks, layer.scales, layer.bias),
                                args.repeat)
                roofline = bytes_read(layer, batch) / bandwidth / ours
                model_ours, model_fp32, model_bf16 = model["aqlm"], model["fp32"], model["bf16"]
                if batch == 1 and name in TARGETS:
                    target = (f">= {TARGETS[name]:g}x fp32: {verdict(fp32 / ours >= TARGETS[name])} / "
                              f"{verdict(model_fp32 / model_ours >= TARGETS[name])}")
                elif batch >= 8:
                    target = (f">= 1x best dense: {verdict(min(fp32, bf16) / ours >= 1)} / "
                              f"{verdict(min(model_fp32, model_bf16) / model_ours >= 1)}")
                else:
                    target = ""
                print(f"{shape:>11} {name:>7} {batch:>5} {kernel:>15} | {ours * 1e3:8.3f} {fp32 * 1e3:8.3f} {bf16 * 1e3:8.3f} | "
                      f"{fp32 / ours:6.2f}x {bf16 / ours:6.2f}x {min(fp32, bf16) / ours:6.2f}x | {roofline:7.1%} | "
                      f"{model_ours * 1e3:8.3f} {model_fp32 / model_ours:6.2f}x {model_bf16 / model_ours:6.2f}x | "
                      f"{bound * 1e3:8.3f} {fp32 / bound:6.2f}x {bf16 / bound:6.2f}x | {target}",
                      flush=True)
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--schemes", nargs="+", default=SCHEMES)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--param-dtype", choices=["float16", "float32", "bfloat16"], default="float16",
                        help="codebook/scale dtype (upstream checkpoints store float16)")
    parser.add_argument("--levels", nargs="+", choices=["scalar", "avx2", "avx512"],
                        help="SIMD levels to run, each in its own process (default: every level above scalar "
                             "that this CPU supports)")
    parser.add_argument("--single-level", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single_level:
        run_level(args)
        return
    print(f"aqlm {aqlm.__version__}, torch {torch.__version__}, {cpu_flags()}")
    order = ["scalar", "avx2", "avx512"]
    levels = args.levels or [lv for lv in order[1:] if order.index(lv) <= order.index(aqlm._C.simd_supported())]
    for level in levels:
        print(f"\n=== AQLM_SIMD={level} ===", flush=True)
        subprocess.run([sys.executable, __file__, "--single-level", *sys.argv[1:]], env={**os.environ, "AQLM_SIMD": level}, check=True)


if __name__ == "__main__":
    main()
