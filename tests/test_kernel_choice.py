"""CPU kernels picked by measurement (aqlm.kernel_choice): cached on disk, forced by env, logged."""
import json
import logging

import pytest
import torch

from aqlm import QuantizedLinear, _C, kernel_choice, ops, pack_codes


def layer_and_input(out=96, inp=64, M=2, nbits=8, tokens=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    codes = pack_codes(torch.randint(0, 2**nbits, (out, inp // 8, M), generator=generator), nbits)
    codebooks = torch.randn(M, 2**nbits, 1, 8, generator=generator)
    scales = torch.rand(out, 1, 1, 1, generator=generator) + 0.5
    layer = QuantizedLinear.from_parts(codes, codebooks, scales, torch.randn(out, generator=generator))
    return layer, torch.randn(tokens, inp, generator=generator)


@pytest.fixture
def measured(tmp_path, monkeypatch):
    """Measurement on, a private cache directory and a fresh chooser (as in a new process)."""
    monkeypatch.setenv("AQLM_KERNEL_CALIBRATION", "1")
    monkeypatch.setenv("AQLM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AQLM_CPU_KERNEL", raising=False)
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "1")
    monkeypatch.setenv("AQLM_BF16_DEQUANTIZE", "1")
    monkeypatch.setattr(ops, "_CHOOSER", kernel_choice.KernelChooser())
    return tmp_path / kernel_choice.CACHE_FILE


def run_with(layer, x, kernel):
    return ops.quantized_matmul_cpu(x, layer.codes, layer.codebooks, layer.scales, layer.bias, kernel=kernel)


def test_first_use_measures_logs_and_caches_then_reuses(measured, monkeypatch, caplog):
    layer, x = layer_and_input()
    with caplog.at_level(logging.DEBUG, logger="aqlm"):
        y = layer(x)
    records = [r.getMessage() for r in caplog.records if "measured" in r.getMessage()]
    assert len(records) == 1 and "2x8g8o1 128x64 t3" in records[0]
    saved = json.loads(measured.read_text())[kernel_choice.cpu_model()]
    (key, chosen), = saved.items()
    assert chosen in ops.applicable_cpu_kernels(3, 8, 1, torch.float32, exact=False)
    assert torch.equal(y, run_with(layer, x, chosen))  # the answer is the chosen kernel's

    monkeypatch.setattr(ops, "_CHOOSER", kernel_choice.KernelChooser())  # a new process
    calls = []
    monkeypatch.setattr(kernel_choice.time, "perf_counter", lambda: calls.append(1) or 0.0)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="aqlm"):
        assert torch.equal(layer(x), y)
    assert not calls and not any("measured" in r.getMessage() for r in caplog.records)


def test_each_token_class_is_measured_once(measured):
    layer, _ = layer_and_input()
    for tokens in (1, 1, 5, 9, 13, 16, 70):
        layer(torch.randn(tokens, 64))
    keys = json.loads(measured.read_text())[kernel_choice.cpu_model()]
    assert sorted(int(key.split(" t")[1].split()[0]) for key in keys) == [1, 5, 16, 128]


def test_the_fastest_candidate_wins_unless_the_prior_is_nearly_as_fast(tmp_path, monkeypatch):
    clock = [0.0]  # a fake clock that each run advances by its kernel's cost: deterministic timings
    monkeypatch.setattr(kernel_choice.time, "perf_counter", lambda: clock[0])
    costs = {"slow": 4.0, "fast": 1.0}

    def run(kernel):
        return lambda: clock.__setitem__(0, clock[0] + costs[kernel])

    chooser = kernel_choice.KernelChooser(tmp_path / "choices.json")
    assert chooser.choose("k", ["slow", "fast"], run) == "fast"
    assert json.loads((tmp_path / "choices.json").read_text())[kernel_choice.cpu_model()] == {"k": "fast"}
    assert chooser.choose("k2", ["slow", "fast"], run, prior="slow") == "fast"  # 4x faster: beats the prior
    costs["fast"] = 3.0
    assert chooser.choose("k3", ["slow", "fast"], run, prior="slow") == "slow"  # 1.33x: the prior stays


def test_one_slow_run_does_not_drop_the_fastest_candidate(tmp_path, monkeypatch):
    clock = [0.0]  # a descheduled thread makes the first timed run of "fast" 100x slower than its cost
    monkeypatch.setattr(kernel_choice.time, "perf_counter", lambda: clock[0])
    runs = {"fast": 0, "slow": 0}

    def one_run(kernel):
        runs[kernel] += 1
        clock[0] += {"fast": 1.0, "slow": 2.0}[kernel] * (100.0 if kernel == "fast" and runs[kernel] == 2 else 1.0)

    def run(kernel):
        return lambda: one_run(kernel)

    chooser = kernel_choice.KernelChooser(tmp_path / "choices.json")
    assert chooser.choose("k", ["fast", "slow"], run) == "fast"


def test_a_win_over_the_prior_must_hold_in_a_second_measurement(tmp_path, monkeypatch):
    clock = [0.0]  # the prior is slowed through the whole first measurement (load elsewhere), then not
    monkeypatch.setattr(kernel_choice.time, "perf_counter", lambda: clock[0])
    runs = {"prior": 0, "other": 0}
    first_pass = 1 + kernel_choice.ROUNDS  # the warm-up run and one measurement's runs

    def one_run(kernel):
        runs[kernel] += 1
        slowed = kernel == "prior" and runs[kernel] <= first_pass
        clock[0] += {"prior": 1.0, "other": 1.2}[kernel] * (3.0 if slowed else 1.0)

    chooser = kernel_choice.KernelChooser(tmp_path / "choices.json")
    assert chooser.choose("k", ["prior", "other"], lambda kernel: lambda: one_run(kernel), prior="prior") == "prior"
    assert runs["other"] == 1 + 2 * kernel_choice.ROUNDS


def test_each_timed_run_starts_with_the_weight_out_of_l2(tmp_path, monkeypatch):
    events = []

    class Evict:
        def sum(self):
            events.append("evict")

    monkeypatch.setattr(kernel_choice.torch, "ones", lambda *a, **k: Evict())
    monkeypatch.setattr(kernel_choice.time, "perf_counter", lambda: float(len(events)))
    chooser = kernel_choice.KernelChooser(tmp_path / "choices.json")
    chooser.choose("k", ["a", "b"], lambda kernel: lambda: events.append(kernel))
    timed = events[2:]  # after one warm-up run each
    assert timed == ["evict", "a", "evict", "b"] * kernel_choice.ROUNDS
    assert 1 << 20 <= kernel_choice.evict_bytes() <= kernel_choice.EVICT_BYTES_MAX


def test_forced_kernel_and_exact_mode(measured, monkeypatch):
    layer, x = layer_and_input(tokens=2)
    monkeypatch.setenv("AQLM_CPU_KERNEL", "decode")
    assert torch.equal(layer(x), run_with(layer, x, "decode"))
    monkeypatch.setenv("AQLM_CPU_KERNEL", "lut")
    assert torch.equal(layer(x), run_with(layer, x, "lut"))
    assert not measured.exists()  # forcing measures nothing
    monkeypatch.setenv("AQLM_CPU_KERNEL", "fastest")
    with pytest.raises(ValueError, match="AQLM_CPU_KERNEL must be one of"):
        layer(x)
    exact = ops.applicable_cpu_kernels(2, 8, 1, torch.float32, exact=True)
    assert "lutq" not in exact and "dequantize_bf16" not in exact
    assert "dequantize_bf16" not in ops.applicable_cpu_kernels(20, 8, 1, torch.float32, exact=False)  # opt-in
    with_bf16 = ops.applicable_cpu_kernels(20, 8, 1, torch.float32, exact=False, bf16=True)
    assert ("dequantize_bf16" in with_bf16) == ops.cpu_has_fast_bf16()
    assert ops.applicable_cpu_kernels(200, 8, 1, torch.float32, exact=False)[0] == "dequantize"
    assert "lutq" not in ops.applicable_cpu_kernels(2, 8, 2, torch.float32, exact=False)  # out_group_size 2


@pytest.mark.parametrize("kernel", ["dequantize", "dequantize_bf16"])
def test_dequantize_paths_match_the_formula(kernel):
    layer, x = layer_and_input(tokens=20)
    expected = x.double() @ layer.reference_weight().double().T + layer.bias.double()
    got = run_with(layer, x, kernel).double()
    tolerance = 1e-4 if kernel == "dequantize" else 2e-2  # bf16 weights and activations: 8-bit mantissas
    error = float((got - expected).abs().max()) / float(expected.abs().max())
    assert error <= tolerance
    if kernel == "dequantize_bf16":
        assert error > 1e-4  # it really multiplies in bf16


def test_classes():
    assert [kernel_choice.token_class(t) for t in (1, 8, 9, 16, 17, 300)] == [1, 8, 16, 16, 32, 512]
    assert [kernel_choice.shape_class(f) for f in (576, 1536, 4096, 11008)] == [1024, 2048, 4096, 16384]


def test_eager_path_equals_the_custom_op_and_follows_weight_changes():
    layer, x = layer_and_input(tokens=3)

    def op():
        return torch.ops.aqlm.quantized_matmul(x, layer.codes, layer.codebooks, layer.scales, layer.bias)

    with torch.no_grad():
        first = layer(x)
        assert torch.equal(first, op())
        layer.codebooks.mul_(2)  # in place: the cached plan must notice
        assert torch.equal(layer(x), op()) and not torch.equal(layer(x), first)
        layer.scales = torch.nn.Parameter(layer.scales * 3, requires_grad=False)  # replaced
        assert torch.equal(layer(x), op())
    x.requires_grad_(True)
    layer(x).sum().backward()  # gradients go through the custom op's autograd formula
    assert x.grad is not None and x.grad.shape == x.shape


def test_fixed_rules_use_quantized_tables_where_they_were_measured_faster():
    """Kx4 codebooks: up to 7 tokens on any SIMD level (from 8 the exact 16-token tables "lutw"
    win); 256 codewords: 1-2 tokens with the AVX-512 VBMI or AVX2 lookups (not the scalar ones),
    "lutw" from 12 to 32 tokens."""
    assert ops.choose_cpu_kernel(7, 4, 4, 1, 8) == "lutq"
    assert ops.choose_cpu_kernel(16, 4, 4, 1, 8) == "lutw"  # exact, and faster from 8 tokens (ops.LUTW_*)
    assert ops.choose_cpu_kernel(17, 4, 4, 1, 8) != "lutq"
    simd = _C.lutq_kernel() in ("avx512vbmi", "avx2")
    assert (ops.choose_cpu_kernel(1, 2, 8, 1, 8) == "lutq") == simd
    assert (ops.choose_cpu_kernel(2, 2, 8, 1, 8) == "lutq") == simd
    assert ops.choose_cpu_kernel(3, 2, 8, 1, 8) != "lutq"
    assert ops.choose_cpu_kernel(11, 2, 8, 1, 8) not in ("lutq", "lutw")
    for tokens in (12, 16, 32):
        assert ops.choose_cpu_kernel(tokens, 2, 8, 1, 8) == "lutw"
        assert ops.choose_cpu_kernel(tokens, 2, 8, 1, 8, exact=True) == "lutw"
    assert ops.choose_cpu_kernel(33, 2, 8, 1, 8) != "lutw"
    assert ops.choose_cpu_kernel(16, 2, 8, 2, 8) != "lutw"  # out_group_size 2: no packed codes
    assert ops.choose_cpu_kernel(1, 2, 8, 1, 8, exact=True) == "lut"
