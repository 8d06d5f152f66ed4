"""aqlm.decode.LlamaDecoder and the C decoding-step kernels, against Transformers and torch formulas."""
import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from aqlm import QuantizedLinear, _C, ops, pack_codes
from aqlm import decode
from aqlm.decode import PROMPT_STEP_TOKENS, LlamaDecoder, _ThreadChoice
from parallel import always_parallel  # noqa: F401 (fixture)
from random_models import quantize_linears


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    options = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    options.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**options)).eval()


IDS = torch.tensor([3, 17, 42, 5, 88, 61, 9, 30, 2, 77])


def reference_logits(model, ids):
    with torch.no_grad():
        return model(ids[None]).logits[0].float()


def greedy(model, ids, tokens):
    """Transformers' greedy tokens, with no end-of-text token (which min_new_tokens would mask)."""
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        return model.generate(ids[None], attention_mask=torch.ones_like(ids[None]), do_sample=False,
                              max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0)


# ---- the C step kernels -----------------------------------------------------------------------


@pytest.mark.parametrize("with_delta", [False, True])
def test_residual_rms_norm_matches_llama_formula(with_delta):
    generator = torch.Generator().manual_seed(0)
    h, delta, weight = (torch.randn(1, 72, generator=generator) for _ in range(3))
    out = torch.empty(1, 72)
    expected_h = h + delta if with_delta else h.clone()
    expected = weight * (expected_h * torch.rsqrt(expected_h.pow(2).mean(-1, keepdim=True) + 1e-5))
    ops.bound_residual_rms_norm(h, delta if with_delta else None, weight, out, 1e-5)()
    torch.testing.assert_close(h, expected_h, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_silu_mul_matches_formula():
    generator = torch.Generator().manual_seed(1)
    gate, up = torch.randn(200, generator=generator) * 4, torch.randn(200, generator=generator)
    expected = F.silu(gate) * up
    ops.bound_silu_mul(gate, up)()
    torch.testing.assert_close(gate, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [1, 3, 255, 257, 1536])
def test_silu_mul_keeps_its_exp_within_two_ulps_over_the_whole_range(size):
    """csrc/decode_step.c computes exp itself (four at a time, clamped to [-87, 88]): relative
    error within 2.4e-7 of the float64 formula, tails and huge gates included (no NaN, no overflow)."""
    gate = torch.linspace(-120, 120, size) if size > 3 else torch.tensor([0.5, -120.0, 95.0][:size])
    up = torch.ones(size)
    expected = gate.double() * torch.sigmoid(gate.double())
    ops.bound_silu_mul(gate, up)()
    tiny = expected.abs() < 1e-30  # e**-120 underflows: silu is 0 to float32 there, and the clamp gives ~-1e-36
    relative = ((gate.double() - expected).abs() / expected.abs().clamp_min(1e-30))[~tiny]
    assert float(relative.max()) < 2.4e-7
    assert torch.isfinite(gate).all() and float(gate[tiny].abs().max() if tiny.any() else 0.0) < 1e-30
    nan = torch.tensor([float("nan"), 1.0, float("nan"), -200.0, 2.0])  # a NaN stays NaN, its neighbours exact
    ops.bound_silu_mul(nan, torch.ones(5))()
    assert nan[0].isnan() and nan[2].isnan() and torch.isfinite(nan[[1, 3, 4]]).all()


def test_attend_one_keeps_a_nan_score_nan():
    """The clamped exp of csrc/decode_step.c must not turn a NaN attention score into a weight of
    e**-87: a head whose query holds a NaN gives NaN outputs, the other heads finite ones."""
    generator = torch.Generator().manual_seed(5)
    heads, kv_heads, D, capacity = 4, 2, 8, 6
    q, k, v = (torch.randn(n, D, generator=generator) for n in (heads, kv_heads, kv_heads))
    q[1, 3] = float("nan")
    table = torch.ones(capacity, D)
    keys, values = torch.randn(capacity, kv_heads, D, generator=generator), torch.randn(capacity, kv_heads, D, generator=generator)
    out = torch.empty(heads, D)
    ops.bound_attend_one(q, k, v, table, torch.zeros(capacity, D), keys, values, out, 0.5)(4)
    assert out[1].isnan().all() and torch.isfinite(out[[0, 2, 3]]).all()


@pytest.mark.parametrize("D", [16, 20])
def test_attend_one_scores_a_key_alike_at_any_position(D):
    """Scores go four cached positions at a time (csrc/decode_step.c: dot4) and the last few one
    at a time (dot), by the same operations in the same order: a key cached at positions 0 and 4
    (1 and 5) gets bit-identical weights, read back from the scores work array."""
    generator = torch.Generator().manual_seed(7)
    heads, kv_heads, capacity, position = 4, 2, 8, 5
    q = torch.randn(heads, D, generator=generator)
    keys, values = torch.randn(capacity, kv_heads, D, generator=generator), torch.randn(capacity, kv_heads, D, generator=generator)
    keys[4] = keys[0]
    k, v = keys[1].clone(), torch.randn(kv_heads, D, generator=generator)  # stored at row 5
    cos, sin = torch.ones(capacity, D), torch.zeros(capacity, D)  # no rotation
    scores, out = np.zeros(heads * capacity, dtype=np.float32), torch.empty(heads, D)
    _C.attend_one(q.numpy(), k.numpy(), v.numpy(), cos.numpy(), sin.numpy(), keys.numpy(), values.numpy(), scores,
                  out.numpy(), heads=heads, kv_heads=kv_heads, position=position, scale=0.3, num_threads=1)
    weights = scores.reshape(heads, capacity)[:, : position + 1]
    assert np.array_equal(weights[:, 0], weights[:, 4]) and np.array_equal(weights[:, 1], weights[:, 5])
    assert not np.array_equal(weights[:, 0], weights[:, 1])


def test_attend_one_matches_rotary_and_grouped_attention():
    """Token by token through the cache, each output equals Transformers' rotary embedding and
    causal grouped-query attention over the whole sequence."""
    heads, kv_heads, D, capacity, length = 6, 2, 16, 12, 9
    generator = torch.Generator().manual_seed(2)
    qs = torch.randn(length, heads, D, generator=generator)
    ks = torch.randn(length, kv_heads, D, generator=generator)
    vs = torch.randn(length, kv_heads, D, generator=generator)
    angles = torch.arange(capacity)[:, None] * torch.rand(D // 2, generator=generator)[None]
    cos, sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
    scale = D**-0.5
    q, k, v, out = torch.empty(heads, D), torch.empty(kv_heads, D), torch.empty(kv_heads, D), torch.empty(heads, D)
    keys, values = torch.zeros(capacity, kv_heads, D), torch.zeros(capacity, kv_heads, D)
    attend = ops.bound_attend_one(q, k, v, cos, sin, keys, values, out, scale)
    rq, rk = apply_rotary_pos_emb(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None], cos[None, :length], sin[None, :length])
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    expected = F.scaled_dot_product_attention(rq, repeat_kv(rk, heads // kv_heads), repeat_kv(vs.transpose(0, 1)[None], heads // kv_heads),
                                              attn_mask=mask, scale=scale)[0].transpose(0, 1)
    for position in range(length):
        q.copy_(qs[position]), k.copy_(ks[position]), v.copy_(vs[position])
        attend(position)
        torch.testing.assert_close(out, expected[position], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(keys[:length], rk[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values[:length], vs, rtol=0, atol=0)


def test_attend_one_gives_the_same_bits_on_any_thread_count(always_parallel):
    """Threads split the heads of a long cache: each head is computed whole by one thread, so the
    output has the same bits as on one thread, and matches grouped-query attention."""
    heads, kv_heads, D, capacity, position = 8, 2, 68, 1500, 1497  # D not a multiple of 8: the dot's tail
    generator = torch.Generator().manual_seed(5)
    keys, values = torch.randn(capacity, kv_heads, D, generator=generator), torch.randn(capacity, kv_heads, D, generator=generator)
    q0, k0, v0 = torch.randn(heads, D, generator=generator), torch.randn(kv_heads, D, generator=generator), torch.randn(kv_heads, D, generator=generator)
    cos, sin = torch.ones(capacity, D), torch.zeros(capacity, D)  # no rotation: the reference is plain attention
    outputs, before = {}, torch.get_num_threads()
    try:
        for threads in (1, always_parallel):
            torch.set_num_threads(threads)  # bound_attend_one reads the thread count when it binds
            runs = []
            for _ in range(5):  # threads racing on shared work space would not give the same bits every time
                q, k, v, out = q0.clone(), k0.clone(), v0.clone(), torch.empty(heads, D)
                ops.bound_attend_one(q, k, v, cos, sin, keys.clone(), values.clone(), out, 0.2)(position)
                runs.append(out)
            assert all(torch.equal(run, runs[0]) for run in runs)
            outputs[threads] = runs[0]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outputs[1], outputs[always_parallel])
    keys[position], values[position] = k0, v0
    expected = F.scaled_dot_product_attention(q0[None, :, None], repeat_kv(keys[: position + 1].transpose(0, 1)[None], 4),
                                              repeat_kv(values[: position + 1].transpose(0, 1)[None], 4), scale=0.2)
    torch.testing.assert_close(outputs[1], expected[0, :, 0], rtol=1e-5, atol=1e-5)


def test_step_kernels_reject_bad_buffers_with_named_errors():
    h, weight, out = torch.zeros(8), torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match="out must have as many elements as h"):
        ops.bound_residual_rms_norm(h, None, weight, torch.zeros(7), 1e-5)
    with pytest.raises(ValueError, match="contiguous float32"):
        ops.bound_residual_rms_norm(h.double(), None, weight, out, 1e-5)
    with pytest.raises(ValueError, match="h must not overlap out"):
        ops.bound_residual_rms_norm(h, None, weight, h, 1e-5)()
    with pytest.raises(ValueError, match="same number of elements"):
        ops.bound_silu_mul(torch.zeros(4), torch.zeros(5))
    q, k, v, o = torch.zeros(4, 8), torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(4, 8)
    table, cache = torch.zeros(3, 8), torch.zeros(3, 2, 8)
    attend = ops.bound_attend_one(q, k, v, table, table.clone(), cache, cache.clone(), o, 0.5)
    with pytest.raises(ValueError, match="position 3 is outside the cache of 3 positions"):
        attend(3)
    with pytest.raises(ValueError, match="keys must have shape"):
        ops.bound_attend_one(q, k, v, table, table.clone(), torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), o, 0.5)
    with pytest.raises(ValueError, match="q must not overlap out"):
        ops.bound_attend_one(q, k, v, table, table.clone(), cache, cache.clone(), q, 0.5)(0)


def test_bound_linear_matches_the_eager_path():
    model = tiny_llama()
    quantize_linears(model)
    layer = model.model.layers[0].mlp.down_proj
    x, out = torch.randn(1, layer.in_features), torch.empty(1, layer.out_features)
    ops.bound_linear_cpu(x, out, layer.codes, layer.codebooks, layer.scales, layer.bias)()
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x), rtol=0, atol=0)
    x16, out16 = x.bfloat16(), torch.empty(1, layer.out_features, dtype=torch.bfloat16)
    ops.bound_linear_cpu(x16, out16, layer.codes, layer.codebooks, layer.scales, layer.bias)()
    with torch.no_grad():
        torch.testing.assert_close(out16, layer(x16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="out must have shape"):
        ops.bound_linear_cpu(x, torch.empty(1, 3), layer.codes, layer.codebooks, layer.scales, layer.bias)
    ops.bound_linear_cpu(torch.empty(0, layer.in_features), torch.empty(0, layer.out_features), layer.codes,
                         layer.codebooks, layer.scales, layer.bias)()  # no tokens: nothing to do, no error


def bound_kernels(monkeypatch) -> list:
    """The kernel names bound from now on, with "decode" made the choice a weight measured alone gives."""
    kernels = []
    bind = ops._C.bind_matmul
    monkeypatch.setattr(ops._C, "bind_matmul", lambda kernel, *args, **kwargs: kernels.append(kernel) or bind(kernel, *args, **kwargs))
    monkeypatch.setattr(ops, "choose_cpu_kernel", lambda *args, **kwargs: "decode")
    monkeypatch.setattr(ops._CHOOSER, "choose", lambda *args, **kwargs: "decode")
    return kernels


def test_bound_linear_takes_the_preferred_kernel_where_it_serves(monkeypatch):
    """``prefer`` replaces the measured choice where that kernel serves the call, not where it does
    not (quantized tables off) nor over AQLM_CPU_KERNEL; an unknown name is refused."""
    model = tiny_llama()
    quantize_linears(model)
    layer = model.model.layers[0].mlp.down_proj
    x, out = torch.randn(1, layer.in_features), torch.empty(1, layer.out_features)
    weight = (layer.codes, layer.codebooks, layer.scales, layer.bias)
    with torch.no_grad():
        expected = layer(x)
    kernels = bound_kernels(monkeypatch)
    ops.bound_linear_cpu(x, out, *weight)
    ops.bound_linear_cpu(x, out, *weight, prefer="lutq")()
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")
    ops.bound_linear_cpu(x, out, *weight, prefer="lutq")
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "1")
    monkeypatch.setenv("AQLM_CPU_KERNEL", "lut")
    ops.bound_linear_cpu(x, out, *weight, prefer="lutq")
    assert kernels == ["decode", "lutq", "decode", "lut"]
    with pytest.raises(ValueError, match="prefer must be one of"):
        ops.bound_linear_cpu(x, out, *weight, prefer="fast")


@pytest.mark.parametrize("lutq_kernel", ["avx2", "scalar"])
def test_decoder_step_takes_quantized_tables_unless_they_are_scalar(lutq_kernel, monkeypatch):
    model = tiny_llama()
    quantize_linears(model)
    kernels = bound_kernels(monkeypatch)
    monkeypatch.setattr(ops, "lutq_kernel_name", lambda: lutq_kernel)
    LlamaDecoder(model, max_length=16)
    assert kernels and set(kernels) == {"lutq" if lutq_kernel != "scalar" else "decode"}


def test_chained_bound_linears_give_the_same_bits():
    """chain_bound_linears only adds prefetch hints (each call names the next, a freed one included):
    every call still writes what it wrote unchained; wrong arguments raise named errors."""
    generator = torch.Generator().manual_seed(3)
    layers = []
    for out, inp in ((96, 64), (64, 96), (40, 64)):  # 2x8g8
        codes = pack_codes(torch.randint(0, 256, (out, inp // 8, 2), generator=generator), 8)
        layers.append(QuantizedLinear.from_parts(codes, torch.randn(2, 256, 1, 8, generator=generator),
                                                 torch.rand(out, 1, 1, 1, generator=generator) + 0.5, None))
    xs = [torch.randn(1, layer.in_features, generator=generator) for layer in layers]
    outs = [torch.empty(1, layer.out_features) for layer in layers]
    calls = [ops.bound_linear_cpu(x, out, layer.codes, layer.codebooks, layer.scales, layer.bias)
             for x, out, layer in zip(xs, outs, layers)]
    for call in calls:
        call()
    before = [out.clone() for out in outs]
    ops.chain_bound_linears(calls + [lambda: None])
    for call in calls:
        call()
    assert all(torch.equal(a, b) for a, b in zip(before, outs))
    ops.chain_bound_linears([calls[0], ops.bound_linear_cpu(xs[1], outs[1], layers[1].codes, layers[1].codebooks,
                                                            layers[1].scales, layers[1].bias)])
    gc.collect()  # the next call of calls[0] is gone: its hint points at freed memory, only prefetched
    calls[0]()
    assert torch.equal(outs[0], before[0])
    with pytest.raises(TypeError, match="bind_next takes 2 arguments"):
        _C.bind_next(calls[0].bound)
    with pytest.raises(ValueError):
        _C.bind_next(calls[0].bound, "not a bound call")


def test_step_program_joins_linears_only_when_their_outs_touch_nothing_of_the_others():
    """Two lutq linears on one x run together unless one's out lies on the other's out or weight
    (then each runs alone, as called in turn)."""
    if ops.lutq_kernel_name() == "scalar":
        pytest.skip("the decoding step takes quantized tables only where they run in SIMD")
    generator = torch.Generator().manual_seed(4)
    layers = [QuantizedLinear.from_parts(pack_codes(torch.randint(0, 256, (32, 8, 2), generator=generator), 8),
                                         torch.randn(2, 256, 1, 8, generator=generator),
                                         torch.rand(32, 1, 1, 1, generator=generator) + 0.5, None) for _ in range(2)]
    x = torch.randn(1, 64, generator=generator)

    def runs(first_out: torch.Tensor, second_out: torch.Tensor) -> tuple:
        calls = [ops.bound_linear_cpu(x, out, layer.codes, layer.codebooks, layer.scales, layer.bias, prefer="lutq")
                 for out, layer in zip((first_out, second_out), layers)]
        return ops.step_program(calls).runs

    def on_packed_codes(layer: QuantizedLinear) -> torch.Tensor:  # 32 floats on the codes its kernel reads
        packed = ops._cpu_plan(layer.codes, layer.codebooks, layer.scales, layer.bias).packed
        return torch.from_numpy(packed).view(torch.float32)[:32].view(1, 32)

    assert runs(torch.empty(1, 32), torch.empty(1, 32)) == (2,)
    assert runs(on_packed_codes(layers[1]), torch.empty(1, 32)) == (1, 1)
    assert runs(torch.empty(1, 32), on_packed_codes(layers[0])) == (1, 1)
    shared = torch.empty(1, 48)
    assert runs(shared[:, :32], shared[:, 16:]) == (1, 1)


def test_bound_linear_keeps_its_buffers_alive():
    """The bound call runs on data addresses: it must hold x and out, or a freed x is read."""
    model = tiny_llama()
    quantize_linears(model)
    layer = model.model.layers[0].mlp.down_proj
    x, out = torch.randn(1, layer.in_features), torch.empty(1, layer.out_features)
    with torch.no_grad():
        expected = layer(x)
    call = ops.bound_linear_cpu(x, out, layer.codes, layer.codebooks, layer.scales, layer.bias)
    del x
    gc.collect()
    reuse = [torch.full((1, layer.in_features), 1e6) for _ in range(64)]  # would take x's freed memory
    call()
    assert reuse and torch.equal(out, expected)


# ---- the decoder --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dense", "aqlm"])
def test_decoder_logits_match_transformers(kind, monkeypatch):
    """Exact fp32 tables: the prompt pass and the token-by-token step give the model's logits."""
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")
    model = tiny_llama()
    if kind == "aqlm":
        quantize_linears(model)
    expected = reference_logits(model, IDS)
    decoder = LlamaDecoder(model, max_length=32)
    torch.testing.assert_close(decoder.logits(IDS), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoder.logits(IDS, one_by_one=True), expected, rtol=1e-4, atol=1e-4)


def test_step_program_gives_the_bits_of_the_calls_one_by_one():
    """An all-quantized decoder runs each step as one C call (ops.step_program); a dense one has
    no program. Without its program the same decoder steps from Python: the same logits, bit for bit."""
    model = tiny_llama()
    quantize_linears(model)
    decoder = LlamaDecoder(model, max_length=32)
    assert all(program is not None for _, _, program in decoder.programs.values())
    assert LlamaDecoder(tiny_llama(), max_length=8).programs[torch.get_num_threads()][2] is None
    in_c = decoder.logits(IDS, one_by_one=True)
    decoder.programs = {count: (steps, final, None) for count, (steps, final, _) in decoder.programs.items()}
    assert torch.equal(decoder.logits(IDS, one_by_one=True), in_c)


def test_step_program_runs_int8_codebooks_with_the_bits_of_the_python_step(monkeypatch):
    """Codebooks of more than 256 codewords: the linears of the step run "decodeq" (int8
    codebooks) in the C program, whose logits are the Python step's bit for bit and near the
    exact prefill's (the int8 rounding: tests/test_decodeq.py bounds it per layer)."""
    monkeypatch.setenv("AQLM_KERNEL_CALIBRATION", "0")
    model = tiny_llama()
    quantize_linears(model, scheme="1x12g8", init_max_iter=1)
    x = torch.randn(1, 64)
    layer = model.model.layers[0].self_attn.q_proj
    assert ops.cpu_kernel_for(x, layer.codes, layer.codebooks, layer.scales, layer.bias) == "decodeq"
    decoder = LlamaDecoder(model, max_length=32)
    in_c = decoder.logits(IDS, one_by_one=True)
    decoder.programs = {count: (steps, final, None) for count, (steps, final, _) in decoder.programs.items()}
    assert torch.equal(decoder.logits(IDS, one_by_one=True), in_c)
    exact = reference_logits(model, IDS)
    assert float((in_c - exact).norm()) <= 3e-2 * float(exact.norm())


def test_step_program_joins_the_linears_of_one_input_with_the_same_bits(always_parallel):
    """With quantized tables, a layer's q, k and v projections run as one call and its gate and up
    projections as another (one parallel region each), on one thread and on several: the logits
    of the Python loop, which calls them one by one, bit for bit."""
    if ops.lutq_kernel_name() == "scalar":
        pytest.skip("the decoding step takes quantized tables only where they run in SIMD")
    model = tiny_llama(seed=11, intermediate_size=160)
    quantize_linears(model)
    before = torch.get_num_threads()
    torch.set_num_threads(always_parallel)
    try:
        decoder = LlamaDecoder(model, max_length=32)
        layer_runs = (1, 3, 1, 1, 1, 2, 1, 1)  # norm, q k v, attention, o, norm, gate up, SiLU, down
        for count in (always_parallel, 1):
            assert decoder.programs[count][2].runs == layer_runs * len(decoder.layers) + (1,)

        def stepped(count: int) -> torch.Tensor:
            decoder.reset()
            with torch.no_grad():
                return torch.cat([decoder._logits(decoder._step(int(token), count)) for token in IDS])

        joined = {count: stepped(count) for count in (always_parallel, 1)}
        decoder.programs = {count: (steps, final, None) for count, (steps, final, _) in decoder.programs.items()}
        for count in (always_parallel, 1):
            assert torch.equal(stepped(count), joined[count])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(joined[1], joined[always_parallel])


def test_step_programs_reject_bad_steps_with_named_errors():
    gate, up, h, weight = torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.ones(4)
    silu, norm = ops.bound_silu_mul(gate, up), ops.bound_residual_rms_norm(h, torch.ones(4), weight, torch.zeros(4), 1e-5)
    with pytest.raises(TypeError, match="steps must be a sequence of tuples, got int"):
        _C.bind_step_program(5)
    steps = [silu.step]
    program = _C.bind_step_program(steps)
    steps.clear()  # the program keeps its own copy of the steps and what they point into
    del silu
    gc.collect()
    _C.run_step_program(program, 0)
    silu = ops.bound_silu_mul(gate, up)
    with pytest.raises(ValueError, match="step 1: a step's kind must be 'linear', 'norm', 'silu' or 'attend', got 'relu'"):
        _C.bind_step_program([silu.step, ("relu", gate)])
    with pytest.raises(TypeError, match="step 0: each step must be a tuple"):
        _C.bind_step_program([["silu", gate.numpy(), up.numpy()]])
    with pytest.raises(ValueError, match="step 0: up must have 4 elements, got 5"):
        _C.bind_step_program([("silu", gate.numpy(), torch.zeros(5).numpy())])
    with pytest.raises(ValueError, match="step 0: gate must not overlap up"):
        _C.bind_step_program([("silu", gate.numpy(), gate.numpy())])
    q, k, v, o = torch.zeros(4, 8), torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(4, 8)
    table, cache = torch.zeros(3, 8), torch.zeros(3, 2, 8)
    attend = ops.bound_attend_one(q, k, v, table, table.clone(), cache, cache.clone(), o, 0.5)
    run = ops.step_program([norm, attend])
    with pytest.raises(ValueError, match="position 3 is outside the cache of 3 positions"):
        run(3)
    assert torch.equal(h, torch.zeros(4))  # refused before any step ran (the norm adds its delta to h)
    run(2)
    assert torch.equal(h, torch.ones(4))
    assert ops.step_program([norm, lambda: None]) is None


def test_decoder_with_quantized_tables_stays_within_their_error(monkeypatch):
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "1")
    model = tiny_llama()
    quantize_linears(model)
    expected = reference_logits(model, IDS)
    got = LlamaDecoder(model, max_length=32).logits(IDS, one_by_one=True)
    assert (got - expected).abs().max() <= 1e-2 * expected.abs().max()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attention_bias": True, "tie_word_embeddings": True}, {"head_dim": 8, "num_key_value_heads": 4}],
    ids=["plain", "bias-tied", "head_dim"],
)
def test_decoder_generates_what_transformers_generates(overrides, monkeypatch):
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")
    model = tiny_llama(seed=3, **overrides)
    quantize_linears(model)
    expected = greedy(model, IDS, 12)
    assert torch.equal(LlamaDecoder(model, max_length=32).generate(IDS, 12), expected)
    assert torch.equal(LlamaDecoder(model, max_length=32).generate(IDS[None], 12), expected)


def test_generate_steps_through_short_prompts_and_runs_longer_ones_in_one_pass(monkeypatch):
    """Prompts of up to PROMPT_STEP_TOKENS tokens go through the decoding step token by token,
    longer ones through the one-pass prefill; both give what transformers generates."""
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")
    model = tiny_llama(seed=3)
    quantize_linears(model)
    passes = []
    one_pass = LlamaDecoder._prefill
    monkeypatch.setattr(LlamaDecoder, "_prefill", lambda self, ids: passes.append(ids.shape[0]) or one_pass(self, ids))
    for length in (1, PROMPT_STEP_TOKENS, PROMPT_STEP_TOKENS + 1):
        ids = IDS[:length]
        assert torch.equal(LlamaDecoder(model, max_length=32).generate(ids, 6), greedy(model, ids, 6)), length
    assert passes == [PROMPT_STEP_TOKENS + 1]


def test_decoder_follows_scaled_rotary_tables_and_refuses_dynamic_ones():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 500000.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    model = tiny_llama(seed=7, rope_parameters=llama3)
    ids = torch.arange(1, 40)
    torch.testing.assert_close(LlamaDecoder(model, max_length=48).logits(ids, one_by_one=True), reference_logits(model, ids),
                               rtol=1e-5, atol=1e-5)
    dynamic = tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="dynamic rope scaling"):
        LlamaDecoder(dynamic)


def test_decoder_runs_qwen2_with_its_biases(monkeypatch):
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")
    torch.manual_seed(4)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).eval()
    quantize_linears(model)
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    decoder = LlamaDecoder(model, max_length=32)
    torch.testing.assert_close(decoder.logits(IDS, one_by_one=True), reference_logits(model, IDS), rtol=1e-4, atol=1e-4)
    assert torch.equal(decoder.generate(IDS, 8), greedy(model, IDS, 8))


@pytest.mark.parametrize("kind", ["dense", "aqlm"])
def test_decoder_runs_a_bfloat16_model_in_float32(kind):
    """Parameters in bfloat16 (as from_pretrained(dtype=torch.bfloat16) gives): the decoder computes
    in float32 and stays within bfloat16 rounding of the model's own bfloat16 forward."""
    model = tiny_llama(seed=6)
    if kind == "aqlm":
        quantize_linears(model)
    expected = reference_logits(model, IDS)
    model.to(torch.bfloat16)
    decoder = LlamaDecoder(model, max_length=32)
    for got in (decoder.logits(IDS), decoder.logits(IDS, one_by_one=True)):
        assert got.dtype == torch.float32
        assert (got - expected).abs().max() <= 5e-2 * expected.abs().max()


@pytest.mark.parametrize("lm_head", ["bf16", "int8"])
def test_decoder_smaller_heads_are_close_and_generate_stops_at_eos(lm_head):
    model = tiny_llama(seed=5)
    expected = reference_logits(model, IDS)
    decoder = LlamaDecoder(model, max_length=32, lm_head=lm_head)
    got = decoder.logits(IDS)
    assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
    if lm_head == "int8":  # exactly the int8 rows' op: the hidden states are the exact decoder's
        q, scales = decoder.head_int8
        hidden = LlamaDecoder(model, max_length=32)._prefill(IDS)
        assert torch.equal(got, ops.int8_linear(hidden, q, scales))
        torch.testing.assert_close(got, hidden @ (q.float() * scales[:, None]).T, rtol=1e-5, atol=1e-4)
    first = int(LlamaDecoder(model, max_length=32).generate(IDS, 1)[0, -1])
    out = LlamaDecoder(model, max_length=32).generate(IDS, 10, eos_token_id=first)
    assert out.shape == (1, len(IDS) + 1) and int(out[0, -1]) == first


@pytest.mark.parametrize("lm_head", ["exact", "int8"])
def test_generate_picks_the_tokens_of_torch_argmax(lm_head, monkeypatch):
    """generate takes each token as the argmax of its logits as torch.argmax would: the first of
    equal maxima, the first NaN where there is one; the int8 head writes its logits into the
    decoder's buffer, the same bits as a fresh tensor."""
    decoder = LlamaDecoder(tiny_llama(seed=5), max_length=32, lm_head=lm_head)
    hidden = decoder._prefill(IDS)[-1:]
    assert decoder._next_token(hidden) == int(decoder._logits(hidden).argmax())
    if lm_head == "int8":
        assert torch.equal(decoder.next_logits, decoder._logits(hidden))
    for values in ([0.5, 2.0, -1.0, 2.0, 1.0], [0.5, float("nan"), 3.0, float("nan"), 1.0], [-3.0, -1.0, -1.0, -2.0, -1.0]):
        logits = torch.tensor([values])
        monkeypatch.setattr(decoder, "_logits", lambda hidden, out=None, logits=logits: logits)
        monkeypatch.setattr(decoder, "head_mode", "exact")
        assert decoder._next_token(hidden) == int(logits.argmax())


def test_decoder_rejects_what_it_cannot_run():
    model = tiny_llama()
    with pytest.raises(ValueError, match="max_length must be a positive integer"):
        LlamaDecoder(model, max_length=0)
    with pytest.raises(ValueError, match="lm_head must be one of"):
        LlamaDecoder(model, lm_head="int4")
    biased = tiny_llama()
    biased.lm_head = torch.nn.Linear(64, 96)
    with pytest.raises(ValueError, match="needs an nn.Linear LM head without bias"):
        LlamaDecoder(biased, lm_head="int8")
    with pytest.raises(ValueError, match="supports model_type"):
        LlamaDecoder(torch.nn.Linear(2, 2))
    decoder = LlamaDecoder(model, max_length=12)
    with pytest.raises(ValueError, match="exceed max_length=12"):
        decoder.generate(IDS, 5)
    with pytest.raises(ValueError, match=r"must lie in \[0, 96\)"):
        decoder.generate(torch.tensor([1, 96]), 1)
    with pytest.raises(ValueError, match="shape \\[tokens\\] or \\[1, tokens\\]"):
        decoder.generate(torch.zeros(2, 3, dtype=torch.long), 1)
    with pytest.raises(TypeError, match="int64 or int32"):
        decoder.generate(IDS.float(), 1)
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative integer"):
        decoder.generate(IDS, -1)
    assert torch.equal(decoder.generate(IDS, 0), IDS[None])


# ---- thread count on shared cores -------------------------------------------------------------


def run_choice(choice: _ThreadChoice, seconds_on: dict, tokens: int) -> list[int]:
    """The thread counts ``choice`` picks over ``tokens`` tokens when a token takes seconds_on[count]."""
    picked = []
    for _ in range(tokens):
        count = choice.next()
        picked.append(count)
        choice.record(count, seconds_on[count])
    return picked


def test_thread_choice_keeps_the_faster_count_and_probes_less_while_it_holds():
    ones = lambda picked: [i for i, count in enumerate(picked) if count == 1]  # noqa: E731
    # the other count a little slower: both probes run in full, the choice holds, and the round it
    # held in doubles (16, then 32 tokens: the longest)
    close = run_choice(_ThreadChoice(4, probe=2, shortest=8, longest=32), {4: 0.010, 1: 0.0105}, 200)
    assert close[:6] == [4, 4, 1, 1, 4, 4]
    assert ones(close) == [2, 3, 18, 19, 50, 51, 82, 83, 114, 115, 146, 147, 178, 179]
    # much slower (above give_up x the current median): its probe stops after one token
    quiet = run_choice(_ThreadChoice(4, probe=2, shortest=8, longest=32), {4: 0.010, 1: 0.017}, 200)
    assert quiet[:4] == [4, 4, 1, 4] and len(ones(quiet)) == 7
    # the other count clearly faster (the current one's core is shared): switch, then probe back briefly
    busy = run_choice(_ThreadChoice(4, probe=2, shortest=8, longest=32), {4: 0.050, 1: 0.017}, 40)
    assert busy[:8] == [4, 4, 1, 1, 1, 1, 1, 1] and busy.count(4) == 4
    # 5% faster is within the margin: no switch
    within = run_choice(_ThreadChoice(2, probe=2, shortest=8, longest=32, margin=0.9), {2: 0.010, 1: 0.0095}, 40)
    assert within[4:8] == [2] * 4


def test_decoder_switching_thread_counts_gives_the_same_tokens(monkeypatch, always_parallel):
    """A decoder built for 2 threads, forced to switch between 2 and 1 thread every few tokens
    (every lutq call really splits its groups between 2 threads), decodes the tokens of a
    one-thread decoder and of Transformers' generate."""
    model = tiny_llama(seed=7)
    quantize_linears(model)
    threads_before = torch.get_num_threads()
    expected = greedy(model, IDS, 10)
    torch.set_num_threads(1)
    one = LlamaDecoder(model, max_length=32).generate(IDS, 10)
    torch.set_num_threads(always_parallel)
    switches = []

    class Forced(_ThreadChoice):
        """Rounds of 3 tokens in which the other count always looks 10x faster: a switch every round
        (fixed times, not measured ones: a stalled token on a loaded machine must not change the rounds)."""

        def __init__(self, threads):
            super().__init__(threads, probe=1, shortest=3, longest=3)

        def record(self, count, seconds):
            switches.append(count)
            super().record(count, 1.0 if count == self.current else 0.1)

    monkeypatch.setattr(decode, "_ThreadChoice", Forced)
    decoder = LlamaDecoder(model, max_length=32)
    assert set(decoder.programs) == {always_parallel, 1}
    got = decoder.generate(IDS, 10)
    assert set(switches) == {always_parallel, 1} and switches[-1] == 1
    assert torch.equal(got, one) and torch.equal(got, expected)
    assert torch.get_num_threads() == always_parallel  # restored after a last token on one thread
    torch.set_num_threads(threads_before)


# ---- python -m aqlm generate ------------------------------------------------------------------


def test_generate_command_prints_what_transformers_generates(capsys):
    from aqlm.cli import main

    argv = ["generate", "stories260k", "--prompt-ids", "1,403,407,261", "--max-new-tokens", "16", "--threads", "1"]
    assert main(argv) == 0
    ours = capsys.readouterr()
    assert main(argv + ["--transformers"]) == 0
    theirs = capsys.readouterr()
    assert ours.out == theirs.out and ours.out.startswith("1,403,407,261,") and len(ours.out.split(",")) == 20
    assert "tokens/s (aqlm.decode.LlamaDecoder, 1 threads)" in ours.err


def test_generate_command_needs_a_tokenizer(tmp_path, capsys):
    from aqlm.cli import main

    tiny_llama().save_pretrained(tmp_path / "model")
    assert main(["generate", str(tmp_path / "model"), "--prompt", "hi"]) == 2
    assert "has no tokenizer, so a text prompt cannot be encoded: give --prompt-ids" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "model"), "--prompt-ids", "1,96"]) == 2
    assert "input_ids must lie in [0, 96)" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "model"), "--prompt-ids", "1,2", "--transformers", "--lm-head", "bf16"]) == 2
    assert "--lm-head bf16 applies to aqlm.decode.LlamaDecoder; with --transformers use exact or int8" in capsys.readouterr().err


def test_generate_command_int8_head_through_transformers_matches_the_decoder(capsys):
    """--lm-head int8 --transformers (aqlm.quantize_lm_head) reads the same int8 rows as LlamaDecoder's int8 head."""
    from aqlm.cli import main

    argv = ["generate", "stories260k", "--prompt-ids", "1,403,407,261", "--max-new-tokens", "16", "--threads", "1",
            "--lm-head", "int8"]
    assert main(argv) == 0
    ours = capsys.readouterr()
    assert main(argv + ["--transformers"]) == 0
    assert capsys.readouterr().out == ours.out
