"""The tied LM head of SmolLM2 (49152 x 576) at decode: torch fp32 and bf16 vs our int8 rows.

At each thread count: the median time of ``F.linear`` in float32 and in bfloat16 and of
``aqlm.ops``' int8 kernel (``ops.int8_linear``, weight int8 [out, in] + one fp32 scale per row) at
every SIMD level this CPU supports, calls interleaved in one run; ratios are fp32 time / time
(higher is faster), and GB/s counts the weight bytes each call must read. On a shared machine
compare the ratios, not the times.

    python benchmarks/bench_lm_head.py [--threads 1 2] [--tokens 1] [--repeat 30]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from aqlm import ops
from bench_matmul import cpu_flags, measure_interleaved

OUT_FEATURES, IN_FEATURES = 49152, 576  # SmolLM2's vocabulary x hidden size
LEVELS = ("scalar", "avx2", "avx512")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(OUT_FEATURES, IN_FEATURES, generator=generator) * 0.02
    weight_bf16 = weight.bfloat16()
    qweight, scales = ops.int8_quantize_rows(weight)
    x = torch.randn(args.tokens, IN_FEATURES, generator=generator)
    x_bf16 = x.bfloat16()
    y = torch.empty(args.tokens, OUT_FEATURES)
    levels = [level for level in LEVELS if LEVELS.index(level) <= LEVELS.index(ops.simd_supported())]
    weight_bytes = {"torch fp32": weight.nbytes, "torch bf16": weight_bf16.nbytes}
    weight_bytes.update({f"int8 {level}": qweight.nbytes + scales.nbytes for level in levels})

    print(f"cpu: {cpu_flags()}")
    print(f"LM head {OUT_FEATURES}x{IN_FEATURES}, n={args.tokens}, median of {args.repeat} interleaved calls")
    for threads in args.threads:
        torch.set_num_threads(threads)
        calls = {"torch fp32": lambda: F.linear(x, weight), "torch bf16": lambda: F.linear(x_bf16, weight_bf16)}
        for level in levels:
            calls[f"int8 {level}"] = lambda level=level: ops.int8_linear(x, qweight, scales, out=y, simd=level)
        times = measure_interleaved(calls, args.repeat)
        fp32 = times["torch fp32"]
        print(f"\nthreads={threads}")
        print(f"{'kernel':<14}{'ms':>9}{'x fp32':>9}{'GB/s':>8}")
        for name, seconds in times.items():
            print(f"{name:<14}{seconds * 1e3:9.3f}{fp32 / seconds:9.2f}{weight_bytes[name] / seconds / 1e9:8.1f}")


if __name__ == "__main__":
    main()
