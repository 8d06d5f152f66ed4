"""Whole-model quantization time: 1 process x 2 threads against 2 processes x 1 thread (``--nproc 2``).

Both runs use ``python -m aqlm quantize`` with the same settings on the first ``--blocks``
transformer blocks of the model (a truncated copy is written to a temporary directory). Reported:
the wall time of each command (process start included) and the quantization time the run reports
itself (``seconds`` in quantization_report.json), their ratios, the load average before and after,
and the CPU model and flags from /proc/cpuinfo. stories260K has no tokenizer, so it is calibrated
on random token ids; models with a tokenizer use WikiText-2 valid.txt.

    python benchmarks/bench_distributed_quantize.py [--model stories260k|smollm2-135m|DIR] [--scheme 4x4g4]
        [--blocks 2] [--nsamples 16] [--seqlen 128] [--max-epochs 4] [--preset cpu-fast]

Each run's wall seconds per phase (rank 0's, from the report) are printed beside each other, and
whether the two checkpoints hold the same tensors bit for bit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aqlm.cli import _resolve_model
from aqlm.kernel_choice import cpuinfo_field
from aqlm.paths import data_file


def truncated_model(model_dir: Path, blocks: int, target: Path) -> Path:
    """A copy of ``model_dir`` keeping its first ``blocks`` transformer blocks (and its tokenizer, if any)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not 1 <= blocks <= model.config.num_hidden_layers:
        raise ValueError(f"--blocks must be in 1..{model.config.num_hidden_layers}, got {blocks}")
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    model.save_pretrained(target)
    try:
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
        return data_file("wikitext-2", "valid.txt")
    except (OSError, ValueError, TypeError):
        tokens = target / "random_tokens.pt"
        generator = torch.Generator().manual_seed(0)
        torch.save(torch.randint(0, model.config.vocab_size, (200_000,), generator=generator), tokens)
        return tokens


def timed_run(command: list[str], out: Path) -> tuple[float, float, dict[str, float]]:
    """(wall seconds of ``command``, the seconds its quantization report states, its seconds per phase)."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    report = json.loads((out / "quantization_report.json").read_text())
    return wall, report["seconds"], report["phase_seconds"]


def same_tensors(first: Path, second: Path) -> bool:
    """Whether two safetensors files hold the same names, dtypes, shapes and bits."""
    from safetensors.torch import load_file

    a, b = load_file(str(first)), load_file(str(second))
    return a.keys() == b.keys() and all(a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]) for name in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="stories260k", help="bundled model name or dense model directory")
    parser.add_argument("--scheme", default="4x4g4")
    parser.add_argument("--blocks", type=int, default=2, help="quantize only the first N transformer blocks")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--max-epochs", type=int, default=4)
    parser.add_argument("--preset", default=None, help="quantize --preset for the options not set here (e.g. cpu-fast)")
    args = parser.parse_args()

    print(f"cpu: {cpuinfo_field('model name')}, {os.cpu_count()} logical cores")
    print(f"flags: {cpuinfo_field('flags')}")
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        model_dir = root / "model"
        dataset = truncated_model(_resolve_model(args.model), args.blocks, model_dir)
        settings = ["--dataset", str(dataset), "--scheme", args.scheme, "--nsamples", str(args.nsamples),
                    "--seqlen", str(args.seqlen), "--max-epochs", str(args.max_epochs), "--steps-per-epoch", "20",
                    "--codebook-update", "lstsq", "--finetune-max-epochs", "1", "--no-progress"]
        if args.preset:
            settings += ["--preset", args.preset]
        runs = {
            "1 process x 2 threads": ["--threads", "2"],
            "2 processes x 1 thread": ["--threads", "1", "--nproc", "2"],
        }
        print(f"model {args.model}, first {args.blocks} blocks, {args.scheme}, {args.nsamples} x {args.seqlen} tokens; "
              f"load average before: {os.getloadavg()[0]:.2f}")
        times = {}
        for name, extra in runs.items():
            out = root / name.replace(" ", "_")
            times[name] = timed_run([sys.executable, "-m", "aqlm", "quantize", str(model_dir), "--out", str(out),
                                     *settings, *extra], out)
            print(f"  {name:<24} wall {times[name][0]:7.1f} s   quantization {times[name][1]:7.1f} s")
        (one_wall, one_inner, one_phases), (two_wall, two_inner, two_phases) = times.values()
        print(f"  {'phase (wall s)':<16}" + "".join(f"{name:>24}" for name in runs))
        for phase in one_phases:
            print(f"  {phase:<16}{one_phases[phase]:24.1f}{two_phases[phase]:24.1f}")
        one_out, two_out = (root / name.replace(" ", "_") / "model.safetensors" for name in runs)
        print(f"checkpoints identical bit for bit: {'yes' if same_tensors(one_out, two_out) else 'NO'}")
        print(f"1x2 / 2x1 time ratio (above 1: two processes are faster): wall {one_wall / two_wall:.2f}, "
              f"quantization {one_inner / two_inner:.2f}; load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
