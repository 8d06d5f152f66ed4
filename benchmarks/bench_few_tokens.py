"""Few-token CPU kernels forced side by side: lutw, lutq, lut, decodeq, decode and bf16 (each bound once as
``aqlm.decode`` binds them: ``aqlm.ops.bound_linear_cpu``) against ``F.linear`` in float32 and
bfloat16, in one process, calls interleaved, medians. Ratios are dense time / kernel time; a
kernel that does not serve the scheme (``aqlm.ops.applicable_cpu_kernels``) shows "-".

    python benchmarks/bench_few_tokens.py [--threads 2] [--tokens 8 16] [--shapes 4096x4096 576x576 ...]

Sets AQLM_QUANTIZED_LUT=1 for its own process, so that lutq is among the kernels compared.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import aqlm
from aqlm import ops
from bench_matmul import cpu_flags

KERNELS = ("lutw", "lutq", "lut", "decodeq", "decode", "bf16")
SHAPES = ["4096x4096", "576x576", "192x576", "1536x576", "576x1536"]


def random_weight(out_features: int, in_features: int, scheme: aqlm.AqlmScheme):
    generator = torch.Generator().manual_seed(0)
    G = in_features // scheme.in_group_size
    codes = torch.randint(0, scheme.codebook_size, (out_features, G, scheme.num_codebooks), generator=generator)
    codebooks = torch.randn(scheme.num_codebooks, scheme.codebook_size, 1, scheme.in_group_size, generator=generator)
    scales = torch.rand(out_features, 1, 1, 1, generator=generator) * 0.02
    return aqlm.pack_codes(codes, scheme.nbits_per_codebook), codebooks / scheme.num_codebooks, scales


def busy_seconds() -> tuple:
    """CPU seconds all processes and this one have been busy (Linux /proc/stat, getrusage)."""
    with open("/proc/stat") as file:
        fields = [int(v) for v in file.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return (sum(fields) - fields[3] - fields[4]) / ticks, usage.ru_utime + usage.ru_stime


def bound(kernel: str, x, out, weight):
    """``kernel`` bound to these buffers (forced through AQLM_CPU_KERNEL, whose value is then restored)."""
    before = os.environ.get("AQLM_CPU_KERNEL")
    os.environ["AQLM_CPU_KERNEL"] = kernel
    try:
        return ops.bound_linear_cpu(x, out, *weight, None)
    finally:
        if before is None:
            del os.environ["AQLM_CPU_KERNEL"]
        else:
            os.environ["AQLM_CPU_KERNEL"] = before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--tokens", nargs="+", type=int, default=[8, 16])
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--schemes", nargs="+", default=["2x8g8"])
    args = parser.parse_args()
    os.environ["AQLM_QUANTIZED_LUT"] = "1"
    torch.set_num_threads(args.threads)
    print(f"aqlm {aqlm.__version__}, torch {torch.__version__}, {cpu_flags()}")
    print(f"SIMD {aqlm._C.simd_default()}, {args.threads} threads; ms, medians of {args.repeat} interleaved runs; "
          f"'/fp32', '/bf16': dense time over kernel time; "
          f"'others': CPUs the other processes kept busy meanwhile (a shared machine: trust rows near 0)")
    print(f"{'shape':>10} {'scheme':>6} {'n':>3} | {'fp32':>7} {'bf16':>7} | " + " | ".join(f"{k:>7} {'/fp32':>5} {'/bf16':>5}" for k in KERNELS) + " | others")
    for shape in args.shapes:
        out_features, in_features = map(int, shape.split("x"))
        dense = torch.randn(out_features, in_features) * 0.02
        dense_bf16 = dense.bfloat16()
        for name in args.schemes:
            scheme = aqlm.AqlmScheme.parse(name)
            weight = random_weight(out_features, in_features, scheme)
            for tokens in args.tokens:
                x = torch.randn(tokens, in_features)
                x_bf16 = x.bfloat16()
                serving = ops.applicable_cpu_kernels(tokens, scheme.nbits_per_codebook, 1, torch.float32, exact=False,
                                                     bf16=ops.bf16_dequantize_requested(),
                                                     in_group_size=scheme.in_group_size, in_features=in_features)
                kernels = [k for k in KERNELS if k in serving]
                outs = {k: torch.empty(tokens, out_features) for k in kernels}
                fns = {k: bound(k, x, outs[k], weight) for k in kernels}
                fns["dense fp32"] = lambda: F.linear(x, dense)
                fns["dense bf16"] = lambda: F.linear(x_bf16, dense_bf16)
                times = {name_: [] for name_ in fns}
                busy0, own0, wall0 = *busy_seconds(), time.perf_counter()
                with torch.no_grad():
                    for fn in fns.values():
                        fn(), fn()
                    for _ in range(args.repeat):
                        for key, fn in fns.items():
                            start = time.perf_counter()
                            fn()
                            times[key].append(time.perf_counter() - start)
                busy1, own1, wall1 = *busy_seconds(), time.perf_counter()
                others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall1 - wall0)
                med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
                if "lutw" in outs and "lut" in outs:
                    torch.testing.assert_close(outs["lutw"], outs["lut"], rtol=1e-4, atol=1e-4)
                fp32, bf16 = med["dense fp32"], med["dense bf16"]
                cells = " | ".join(f"{med[k]:7.3f} {fp32 / med[k]:5.2f} {bf16 / med[k]:5.2f}" if k in outs
                                   else f"{'-':>7} {'-':>5} {'-':>5}" for k in KERNELS)
                print(f"{shape:>10} {name:>6} {tokens:>3} | {fp32:7.3f} {bf16:7.3f} | {cells} | {others:5.2f}", flush=True)


if __name__ == "__main__":
    main()
