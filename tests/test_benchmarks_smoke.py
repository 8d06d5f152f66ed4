"""benchmarks/bench_7b_block.py end to end at a tiny scale (seconds): it runs the product's block
quantization and prints its phase table and estimates, labelled as not the 7B shape; and
benchmarks/bench_lm_head.py with two repeats at one thread; benchmarks/bench_few_tokens.py on one small
shape; benchmarks/bench_bf16_tiles.py on one small shape; benchmarks/bench_quantize_layer.py's
extrapolation from a part of the rows."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_7b_block_tiny_scale():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_7b_block.py"),
               "--scale", "0.0625", "--nsamples", "2", "--seqlen", "32", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for phase in ("xtx", "kmeans_init", "beam_search", "codebook_update", "finetune", "output_check", "block total"):
        assert f"\n{phase} " in out
    assert "NOT the 7B shape" in out
    assert "ASSUMPTION, not a measurement" in out
    assert "estimate / target" in out


def test_bench_lm_head_prints_every_supported_level_against_fp32():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_lm_head.py"), "--threads", "1", "--repeat", "2"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ("cpu:", "threads=1", "torch fp32", "torch bf16", "int8 scalar", "x fp32"):
        assert label in result.stdout


def test_bench_few_tokens_prints_every_kernel_and_the_cpu_flags():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    env.pop("AQLM_CPU_KERNEL", None)
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_few_tokens.py"), "--threads", "1", "--repeat", "2",
               "--shapes", "192x576", "--tokens", "9", "--schemes", "2x8g8", "1x12g8"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ("flags:", "lutw", "lutq", "decodeq", "decode", "192x576"):
        assert label in result.stdout
    wide = next(line for line in result.stdout.splitlines() if "1x12g8" in line)
    assert wide.count(" - ") >= 3  # lutw, lutq and lut do not serve 4096 codewords


def test_bench_bf16_tiles_prints_the_tiles_beside_the_other_kernels():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    env.pop("AQLM_CPU_KERNEL", None)
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_bf16_tiles.py"), "--threads", "1", "--repeat", "1",
               "--shapes", "64x96", "--tokens", "4", "70", "--schemes", "1x16g8", "2x8g8"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for label in ("flags:", "bfloat16 tile kernel here:", "bf16 ", "decode", "lutw", "dequantize", "64x96"):
        assert label in result.stdout


def test_bench_quantize_layer_extrapolates_only_a_time_that_grows_with_rows():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from bench_quantize_layer import extrapolate
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    assert extrapolate(3.0, 1.0, 8, 4096) == 1.0 + 2.0 * 512
    assert extrapolate(0.74, 0.56, 8, 4096) > 0.74
    assert extrapolate(0.5, 0.6, 8, 4096) is None, "one group took longer than 8 rows: no negative estimate"
    assert extrapolate(0.5, 0.5, 8, 4096) is None
