"""Time quantizing one Llama-2-7B decoder block, phase by phase, and extrapolate to the whole model.

One ``transformers`` LlamaDecoderLayer at Llama-2-7B shapes (hidden 4096, intermediate 11008,
32 heads of 128, float32) gets seeded synthetic weights W ~ N(0, 1/in). Its calibration hidden
states [nsamples, seqlen, 4096] are seeded correlated random inputs X = Z (I + strength U V^T / d)
(Z, U, V Gaussian, U and V of rank 64), so every linear sees a realistic, non-white X^T X.

The block is the only layer of a LlamaForCausalLM with a 64-token vocabulary: its keyword
arguments (rotary position embeddings, causal mask, position ids) are captured by the product's
own ``aqlm.calibration.capture_block_inputs`` on random token windows, exactly as
``quantize_model`` gets them; only the hidden states entering the block are replaced by the
synthetic ones (a 64-entry embedding table would give an X^T X of rank 64). The one-off
embedding pass is timed too. Loading the dense model and writing the final checkpoint are not
measured.

The block is then quantized by the product's ``aqlm.quantize.model._quantize_block`` (dense
targets, input groups, X^T X per group, k-means init, beam search, codebook updates,
fine-tuning, output check) with a ``PhaseTimer``, and saved by ``ProgressStore.save`` to a
temporary directory, as ``quantize_model`` does per block. The settings are those of
``python -m aqlm quantize --preset cpu-fast --scheme SCHEME`` (built by the CLI's own parser):
32 windows of 512 tokens unless ``--nsamples`` / ``--seqlen`` say otherwise.

Printed: CPU model and flags, threads, load average before and after, wall and CPU seconds per
phase, the block total, 32 blocks on this machine, a 32-core server estimate (an assumption,
stated in the output) and the ratio to the target of 6 h on 2 cores.

Full size (long: give it an otherwise idle machine; a few GB of memory, the float64 X^T X of
down_proj alone is 0.9 GB):

    PYTHONPATH=.:benchmarks python benchmarks/bench_7b_block.py --threads 2

Smoke test (seconds; NOT the 7B shape, labelled so in the output):

    PYTHONPATH=.:benchmarks python benchmarks/bench_7b_block.py --scale 0.0625 --nsamples 2 --seqlen 64 --threads 1

Options: --scheme 2x8g8 --nsamples N --seqlen N --steps-per-epoch N --threads N --scale S --seed N
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import aqlm
from aqlm.argtypes import OneLineErrorParser, int_at_least, scheme_type
from aqlm.calibration import capture_block_inputs, find_linears, get_blocks
from aqlm.cli import add_quantize_arguments, quantize_config_from_args
from aqlm.kernel_choice import cpuinfo_field
from aqlm.distributed import World
from aqlm.quantize.distributed import CoreShare
from aqlm.quantize.model import ProgressStore, QuantizeConfig, _PARAM_DTYPES, _quantize_block
from aqlm.quantize.phases import PHASES, PhaseTimer

HIDDEN, INTERMEDIATE, HEADS, HEAD_DIM, BLOCKS, VOCAB = 4096, 11008, 32, 128, 32, 32000
SERVER_CORES = 32
TARGET_HOURS, TARGET_CORES = 6.0, 2
MIX_RANK, MIX_STRENGTH = 64, 4.0
TINY_VOCAB = 64
IO_PHASES = ("saving",)


@dataclass
class BlockShape:
    """Sizes of the decoder block under test (Llama-2-7B at scale 1)."""

    hidden: int
    intermediate: int
    heads: int
    scale: float

    @classmethod
    def scaled(cls, scale: float) -> "BlockShape":
        """Llama-2-7B sizes times ``scale``: whole 128-wide heads, intermediate a multiple of 16."""
        heads = max(1, round(HEADS * scale))
        intermediate = max(16, round(INTERMEDIATE * scale / 16) * 16)
        return cls(heads * HEAD_DIM, intermediate, heads, scale)

    @property
    def is_7b(self) -> bool:
        """Whether these are Llama-2-7B's own sizes (scale 1)."""
        return self.hidden == HIDDEN and self.intermediate == INTERMEDIATE and self.heads == HEADS

    def describe(self) -> str:
        """One line for the output, saying plainly when the shape is not 7B's."""
        label = "Llama-2-7B shape" if self.is_7b else f"--scale {self.scale}: NOT the 7B shape, smoke test only"
        return f"hidden {self.hidden}, intermediate {self.intermediate}, {self.heads} heads of {HEAD_DIM} ({label})"


def scale_type(text: str) -> float:
    """An argparse type: a float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    """This benchmark's options; bad values end the run with a one-line error (exit code 2)."""
    parser = OneLineErrorParser(prog="bench_7b_block.py", description=__doc__.split("\n")[0])
    parser.add_argument("--scheme", type=scheme_type, default="2x8g8", help="AQLM scheme (default 2x8g8)")
    parser.add_argument("--nsamples", type=int_at_least(1), default=None, help="windows (default: cpu-fast's)")
    parser.add_argument("--seqlen", type=int_at_least(2), default=None, help="tokens per window (default: cpu-fast's)")
    parser.add_argument("--steps-per-epoch", type=int_at_least(1), default=None,
                        help="codebook-update steps per round (default: cpu-fast's)")
    parser.add_argument("--threads", type=int_at_least(1), default=len(os.sched_getaffinity(0)),
                        help="torch and C threads (default: the usable CPUs)")
    parser.add_argument("--scale", type=scale_type, default=1.0, help="shrink the block's sizes (smoke tests only)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = BlockShape.scaled(args.scale)
    for out_features, in_features in ((shape.hidden, shape.hidden), (shape.intermediate, shape.hidden),
                                      (shape.hidden, shape.intermediate)):
        try:
            args.scheme.check_shape(out_features, in_features)
        except ValueError as error:
            parser.error(f"scheme {args.scheme.name} at {shape.describe()}: {error}")
    return args


def preset_config(args: argparse.Namespace) -> QuantizeConfig:
    """The QuantizeConfig of ``python -m aqlm quantize --preset cpu-fast`` with this run's options."""
    cli = OneLineErrorParser(prog="bench_7b_block.py")
    add_quantize_arguments(cli)
    argv = ["unused-model", "--dataset", "unused", "--out", "unused", "--preset", "cpu-fast",
            "--scheme", args.scheme.name, "--threads", str(args.threads), "--seed", str(args.seed)]
    for option in ("nsamples", "seqlen", "steps_per_epoch"):
        if getattr(args, option) is not None:
            argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    return quantize_config_from_args(cli.parse_args(argv))


def build_model(shape: BlockShape, config: QuantizeConfig, seed: int) -> nn.Module:
    """A one-block float32 LlamaForCausalLM whose linears hold seeded N(0, 1/in) weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=1, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=max(4096, config.seqlen), rms_norm_eps=1e-5, tie_word_embeddings=True,
        use_cache=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(model_config).float().eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, linear in sorted(find_linears(get_blocks(model)[0]).items()):
            linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator) / linear.in_features**0.5)
    return model


def correlated_hidden_states(nsamples: int, seqlen: int, hidden: int, seed: int) -> torch.Tensor:
    """[nsamples, seqlen, hidden] rows of X = Z (I + strength U V^T / hidden), float32, one window at a time."""
    generator = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(hidden, MIX_RANK, generator=generator)
    v = torch.randn(hidden, MIX_RANK, generator=generator)
    states = torch.empty(nsamples, seqlen, hidden)
    for window in states:
        z = torch.randn(seqlen, hidden, generator=generator)
        window.copy_(z + (z @ u) @ v.T * (MIX_STRENGTH / hidden))
    return states


def hours(seconds: float) -> str:
    """``1.23 h (4428 s)``."""
    return f"{seconds / 3600:.2f} h ({seconds:.0f} s)"


def main(argv: list[str]) -> None:
    """Build the block and its inputs, quantize it as quantize_model does, print the timings and estimates."""
    args = parse_args(argv)
    config = preset_config(args)
    shape = BlockShape.scaled(args.scale)
    torch.set_num_threads(args.threads)
    usable = len(os.sched_getaffinity(0))
    load_before = os.getloadavg()

    print(f"cpu: {cpuinfo_field('model name')}; {os.cpu_count()} logical CPUs, {usable} usable")
    print(f"flags: {cpuinfo_field('flags')}")
    print(f"software: aqlm {aqlm.__version__} ({Path(aqlm.__file__).parent}), torch {torch.__version__}, "
          f"Python {platform.python_version()}")
    print(f"threads: {args.threads} (torch and C kernels); load average before: "
          + ", ".join(f"{value:.2f}" for value in load_before))
    print(f"block: {shape.describe()}, float32, seed {args.seed}")
    print(f"settings: --preset cpu-fast --scheme {config.layer.scheme.name}: {config.nsamples} windows x "
          f"{config.seqlen} tokens, max_epochs {config.layer.max_epochs}, steps_per_epoch "
          f"{config.layer.steps_per_epoch}, codebook_update {config.layer.codebook_update}, init_max_iter "
          f"{config.layer.init_max_iter}, finetune_max_epochs {config.finetune.max_epochs}")

    started = time.perf_counter()
    model = build_model(shape, config, args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    windows = torch.randint(0, TINY_VOCAB, (config.nsamples, config.seqlen), generator=generator)
    embed_started = time.perf_counter()
    _, block_kwargs = capture_block_inputs(model, windows, config.batch_size, progress=False)
    embed_seconds = time.perf_counter() - embed_started
    inputs = correlated_hidden_states(config.nsamples, config.seqlen, shape.hidden, args.seed)
    print(f"setup (building the block and {tuple(inputs.shape)} inputs, not part of a real run): "
          f"{time.perf_counter() - started:.1f} s; embedding pass (capture_block_inputs): {embed_seconds:.2f} s")
    print(f"block kwargs from capture_block_inputs: {', '.join(sorted(block_kwargs))}; "
          f"attention: {model.config._attn_implementation}")

    block = get_blocks(model)[0]
    timer = PhaseTimer()
    param_dtype = _PARAM_DTYPES[config.param_dtype]
    world = World()
    record, _ = _quantize_block(block, 0, inputs, None, block_kwargs, config, param_dtype, False, print, timer, world,
                                CoreShare.gather(world, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as directory, timer.phase("saving"):
        store = ProgressStore(Path(directory), {"benchmark": "bench_7b_block"})
        store.start(resume=False)
        store.save(0, block, record)
    load_after = os.getloadavg()
    print(f"block output error after fine-tuning: {record['output_error']:.4f}")
    print("load average after: " + ", ".join(f"{value:.2f}" for value in load_after))

    wall, cpu = timer.as_dict(), timer.cpu_dict()
    block_wall, block_cpu = sum(wall.values()), sum(cpu.values())
    print(f"\n{'phase':<16}{'wall s':>10}{'share':>8}{'CPU s':>10}")
    for name in PHASES:
        print(f"{name:<16}{wall[name]:>10.2f}{100 * wall[name] / block_wall:>7.1f}%{cpu[name]:>10.2f}")
    print(f"{'block total':<16}{block_wall:>10.2f}{100.0:>7.1f}%{block_cpu:>10.2f}")

    label = "" if shape.is_7b else "  [NOT the 7B shape: --scale smoke test, these numbers mean nothing for 7B]"
    whole = BLOCKS * block_wall + embed_seconds
    print(f"\nextrapolation to {BLOCKS} blocks{label}")
    print(f"  this machine, --threads {args.threads}: {BLOCKS} x {block_wall:.1f} s + embedding pass "
          f"{embed_seconds:.1f} s = {hours(whole)} (model loading and the final checkpoint not included)")
    from_cpu = BLOCKS * block_cpu / args.threads + embed_seconds
    print(f"  the same from CPU time, {BLOCKS} x {block_cpu:.1f} CPU s / {args.threads} (as if every thread were busy "
          f"all the time on a core of its own: a lower bound): {hours(from_cpu)}")
    factor = SERVER_CORES / args.threads
    compute = sum(value for name, value in wall.items() if name not in IO_PHASES)
    server = BLOCKS * (compute / factor + (block_wall - compute)) + embed_seconds
    print(f"  {SERVER_CORES}-core server: {hours(server)}")
    print(f"    ASSUMPTION, not a measurement: every phase but saving runs {factor:g}x faster ({SERVER_CORES} cores / "
          f"--threads {args.threads} here), i.e. k-means, beam search, codebook updates and the torch matrix products "
          f"scale linearly with cores, at this machine's per-core speed and with no other load; saving is not sped up")
    ratio = whole / (TARGET_HOURS * 3600)
    verdict = (" (meets it)" if ratio <= 1 else " (misses it)") if shape.is_7b else ""
    caveat = "" if args.threads == TARGET_CORES else f" (measured with --threads {args.threads}, not {TARGET_CORES})"
    print(f"  target <= {TARGET_HOURS:g} h on {TARGET_CORES} cores: estimate / target = {ratio:.2f}"
          f"{verdict}{caveat}{label}")
    if shape.is_7b:
        dense = BLOCKS * (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTERMEDIATE + 2 * HIDDEN) + 2 * VOCAB * HIDDEN + HIDDEN
        print(f"  memory: quantize_model loads the dense model in float32, {dense * 4 / 2**30:.1f} GiB for Llama-2-7B; "
              f"this machine has {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.1f} GiB")


if __name__ == "__main__":
    main(sys.argv[1:])
