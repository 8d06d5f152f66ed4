"""One beam-search pass of the layer quantizer: the C core against the pure-torch baseline.

A synthetic layer at an LLM shape (weight W ~ N(0, 1/in), XTX from correlated activations
X = Z (I + strength U V^T / in), Z, U, V Gaussian, a few thousand rows; everything seeded) is initialised
once per scheme exactly as the quantizer does it (scales from group norms, residual k-means in C),
then both implementations run one greedy (or beam) pass from that same start, visiting codes in
the same shuffled order, in the same process. Reported per scheme: relative output error
tr(dW XTX dW^T) / tr(W XTX W^T) before and after each pass, wall times and the speed ratio.

Both timings are end to end from (W, XTX, codes, codebooks, scales): each includes one dense
[out, in] x [in, in] product for the starting gradient or losses. If the torch pass over all rows
would take too long (--torch-rows), it runs on the first N output rows and its time for all rows
is extrapolated linearly, after taking out the part that does not grow with rows (measured on one
output group); the output says so.

    python benchmarks/bench_quantize_layer.py [--shape 4096x4096] [--schemes 2x8g8 1x16g8]
        [--threads 2] [--torch-rows N] [--beam-size 1] [--tokens 4096] [--seed 0]
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

import aqlm
from aqlm import _C
from aqlm.format import AqlmScheme
from aqlm.ops import beam_search
from beam_search_torch import beam_search_torch, visiting_order
from aqlm.quantize.layer import LayerConfig, LayerObjective, init_quantized_weight

# k-means settings per codebook size: 2**16 centroids over millions of points would take the
# better part of an hour at full settings on a small CPU, so their initialisation is capped.
INIT_FULL = dict(init_max_iter=25, init_max_points_per_centroid=None)
INIT_CAPPED = dict(init_max_iter=3, init_max_points_per_centroid=4)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="4096x4096", help="out_features x in_features")
    parser.add_argument("--schemes", nargs="+", default=["2x8g8", "1x16g8"])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--torch-rows",
        type=int,
        default=None,
        help="run the torch pass on the first N output rows and extrapolate (default: all rows for "
        "codebooks up to 256 entries, 512 rows for larger ones)",
    )
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=4096, help="rows of the synthetic activations X")
    parser.add_argument("--rank", type=int, default=64, help="rank of the correlating term U V^T")
    parser.add_argument(
        "--strength", type=float, default=4.0, help="scale of U V^T / in (its singular values are about this)"
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def machine_info(threads: int) -> list[str]:
    """CPU model, cores and what this run uses (the load average shows how shared the machine is)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"machine: {model}; {os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable; "
        f"load average {load}",
        f"software: aqlm {aqlm.__version__}, torch {torch.__version__}, Python {platform.python_version()}; "
        f"C core SIMD {_C.simd_default()}; {threads} threads for both C and torch",
    ]


def synthetic_layer(
    out_features: int, in_features: int, tokens: int, rank: int, strength: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [out, in], XTX = X^T X / tokens) with X = Z (I + strength U V^T / in), float32."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
    u = torch.randn(in_features, rank, generator=generator)
    v = torch.randn(in_features, rank, generator=generator)
    activations = torch.randn(tokens, in_features, generator=generator)
    activations = activations + (activations @ u) @ v.T * (strength / in_features)
    return weight, activations.T @ activations / tokens


@dataclass
class PassResult:
    """One implementation's pass: codes after it, relative error after it, seconds."""

    codes: torch.Tensor
    error: float
    seconds: float


def run_c(objective: LayerObjective, codes, codebooks, scales, beam_size: int, seed: int, threads: int) -> tuple:
    """The quantizer's C pass (LayerObjective gradient and losses, then aqlm.ops.beam_search).
    Returns (result, seconds of the C call alone)."""
    codes = codes.clone()
    start = time.perf_counter()
    _, gradient, losses = objective.residual_terms(codes, codebooks, scales)
    gradient, losses = gradient.contiguous(), losses.contiguous()
    search_start = time.perf_counter()
    beam_search(
        objective.xtx, codebooks, scales, codes, gradient, losses,
        beam_size=beam_size, shuffle=True, seed=seed, num_threads=threads,
    )
    end = time.perf_counter()
    return PassResult(codes, float(losses.sum()) / objective.reference, end - start), end - search_start


def run_torch(objective: LayerObjective, codes, codebooks, scales, beam_size: int, seed: int) -> PassResult:
    """The pure-torch pass in the same visiting order as the C pass with this seed."""
    group_order, codebook_order = visiting_order(codes.shape[1], codes.shape[2], shuffle=True, seed=seed)
    start = time.perf_counter()
    new_codes, losses = beam_search_torch(
        objective.weight,
        objective.xtx,
        codebooks,
        scales,
        codes,
        beam_size=beam_size,
        group_order=group_order,
        codebook_order=codebook_order,
    )
    seconds = time.perf_counter() - start
    return PassResult(new_codes, float(losses.sum()) / objective.reference, seconds)


def bench_scheme(
    scheme: AqlmScheme, weight: torch.Tensor, xtx: torch.Tensor, args: argparse.Namespace, torch_rows: Optional[int]
) -> None:
    out_features = weight.shape[0]
    og = scheme.out_group_size
    init = INIT_FULL if scheme.codebook_size <= 256 else INIT_CAPPED
    config = LayerConfig(scheme=scheme, seed=args.seed, num_threads=args.threads, **init)
    points = init["init_max_points_per_centroid"]
    print(f"\n== {scheme.name} ({scheme.bits_per_weight(*weight.shape):.3f} bits per weight), beam {args.beam_size}")
    print(
        f"init: residual k-means in C, {init['init_max_iter']} iterations, "
        + ("all points" if points is None else f"trained on at most {points} points per centroid (capped)")
    )
    start = time.perf_counter()
    codes, codebooks, scales = init_quantized_weight(weight, config)
    print(f"init time: {time.perf_counter() - start:.1f} s")
    objective = LayerObjective(weight, xtx, og)
    before = objective.relative_error(codes, codebooks, scales)
    seed = args.seed * 1009

    c_result, c_search = run_c(objective, codes, codebooks, scales, args.beam_size, seed, args.threads)
    print(f"relative error before: {before:.6f}")
    print(
        f"C core:     after {c_result.error:.6f}  time {c_result.seconds:8.2f} s  "
        f"(beam search call {c_search:.2f} s, the rest is the starting gradient in torch)"
    )

    rows = out_features if torch_rows is None else min(out_features, max(og, torch_rows // og * og))
    groups = rows // og
    part = LayerObjective(weight[:rows], xtx, og)
    torch_result = run_torch(part, codes[:groups], codebooks, scales[:groups], args.beam_size, seed)
    if rows == out_features:
        estimate = torch_result.seconds
        print(f"torch:      after {torch_result.error:.6f}  time {torch_result.seconds:8.2f} s  (all rows)")
    else:
        one_group = LayerObjective(weight[:og], xtx, og)
        fixed = run_torch(one_group, codes[:1], codebooks, scales[:1], args.beam_size, seed).seconds
        estimate = extrapolate(torch_result.seconds, fixed, rows, out_features)
        c_part_error = part.relative_error(c_result.codes[:groups], codebooks, scales[:groups])
        part_before = part.relative_error(codes[:groups], codebooks, scales[:groups])
        print(
            f"torch:      timed on the first {rows} of {out_features} rows only: {torch_result.seconds:.2f} s, "
            f"of which {fixed:.2f} s does not grow with rows (timed on one output group)"
        )
        if estimate is None:
            print(f"            the time that grows with rows is lost in timing noise at {rows} rows "
                  f"(one output group took longer): no extrapolation; give --torch-rows more rows")
        else:
            print(
                f"            all rows extrapolated linearly: {estimate:.2f} s "
                f"(plain linear scaling would say {torch_result.seconds * out_features / rows:.2f} s)"
            )
        print(
            f"            on those {rows} rows: error before {part_before:.6f}, after torch {torch_result.error:.6f}, "
            f"after C {c_part_error:.6f}"
        )
    same = (torch_result.codes == c_result.codes[:groups]).float().mean().item()
    print(f"codes identical to the C pass on the rows torch ran: {100 * same:.3f}%")
    if estimate is not None:
        print(f"speed ratio torch / C: {estimate / c_result.seconds:.1f}x")


def extrapolate(seconds: float, fixed: float, rows: int, out_features: int) -> Optional[float]:
    """The time for ``out_features`` rows from ``seconds`` on ``rows`` of them, of which ``fixed`` does
    not grow with rows; None when the part that grows is not above timing noise (``seconds <= fixed``)."""
    growing = seconds - fixed
    return fixed + growing * out_features / rows if growing > 0 else None


def main() -> None:
    args = parse_args()
    print("command: " + " ".join(shlex.quote(part) for part in [sys.executable, *sys.argv]))
    for line in machine_info(args.threads):
        print(line)
    torch.set_num_threads(args.threads)
    out_features, in_features = (int(size) for size in args.shape.lower().split("x"))
    start = time.perf_counter()
    weight, xtx = synthetic_layer(out_features, in_features, args.tokens, args.rank, args.strength, args.seed)
    print(
        f"layer: {out_features}x{in_features}, XTX from {args.tokens} correlated activation rows "
        f"(rank-{args.rank} mixing of strength {args.strength}), seed {args.seed}; "
        f"built in {time.perf_counter() - start:.1f} s"
    )
    for name in args.schemes:
        scheme = AqlmScheme.parse(name)
        default_rows = None if scheme.codebook_size <= 256 else 512
        bench_scheme(scheme, weight, xtx, args, args.torch_rows if args.torch_rows is not None else default_rows)


if __name__ == "__main__":
    main()
