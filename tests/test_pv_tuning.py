"""PV-Tuning: subspace re-encoding, the three V-step variants, the loss, the training loop, resume, errors."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from aqlm import QuantizedLinear, save_quantized
from aqlm.calibration import find_linears, get_blocks
from aqlm.format import AqlmScheme, pack_codes
from aqlm.ops import dequantize
from aqlm.pv_tuning import (
    AdamLamb,
    PVConfig,
    PVOptimizer,
    QuantizedEntry,
    dequantized_student,
    distillation_loss_sum,
    evaluate_student,
    load_student,
    pv_tune,
    reencode_codes,
    select_code_groups,
)
from aqlm.pv_tuning import cli, loss as pv_loss
from aqlm.pv_tuning.train import CHECKPOINT_DIR, REPORT_FILE, set_checkpointing
from aqlm.quantize.layer import LayerConfig, init_quantized_weight

REPO = Path(__file__).resolve().parents[1]
VOCAB = 96


# ---- fixtures --------------------------------------------------------------------------------


def small_llama(seed: int = 0, hidden: int = 32, vocab: int = VOCAB) -> LlamaForCausalLM:
    """A random two-layer Llama (float32, eval mode)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def quantize_linears(model: nn.Module, scheme: AqlmScheme, dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace every block linear by a QuantizedLinear from a quick k-means initialisation."""
    config = LayerConfig(scheme=scheme, init_max_iter=8)
    for block in get_blocks(model):
        for name, linear in find_linears(block).items():
            codes, codebooks, scales = init_quantized_weight(linear.weight.detach(), config)
            block.set_submodule(name, QuantizedLinear.from_parts(codes, codebooks.to(dtype), scales.to(dtype)))
    return model


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A dense teacher, its 2x4g4 AQLM student, and a token file, on disk."""
    root = tmp_path_factory.mktemp("pv_models")
    dense = small_llama(seed=0)
    dense.save_pretrained(root / "dense")
    student = quantize_linears(small_llama(seed=0), AqlmScheme(2, 4, 4))
    save_quantized(student, root / "aqlm")
    teacher_tokens = torch.randint(0, VOCAB, (3000,), generator=torch.Generator().manual_seed(0))
    torch.save(teacher_tokens, root / "tokens.pt")
    return {"dense": root / "dense", "aqlm": root / "aqlm", "tokens": root / "tokens.pt"}


def fast_config(**overrides) -> PVConfig:
    settings = dict(
        nsamples=8, seqlen=32, num_steps=4, batch_size=2, microbatch_size=1, eval_windows=2, eval_every=2,
        save_every=2, code_lr=0.3, max_code_change_per_step=0.05,
    )
    settings.update(overrides)
    return PVConfig(**settings)


def random_weight(out_features: int, in_features: int, scheme: AqlmScheme, seed: int):
    generator = torch.Generator().manual_seed(seed)
    codebooks = torch.randn(scheme.num_codebooks, scheme.codebook_size, scheme.out_group_size, scheme.in_group_size,
                            generator=generator)
    shape = (out_features // scheme.out_group_size, in_features // scheme.in_group_size, scheme.num_codebooks)
    codes = pack_codes(torch.randint(0, scheme.codebook_size, shape, generator=generator), scheme.nbits_per_codebook)
    scales = torch.rand(shape[0], 1, 1, 1, generator=generator) + 0.5
    return codes, codebooks, scales


def saved_tensors(directory: Path) -> dict:
    return load_file(str(directory / "model.safetensors"))


# ---- re-encoding -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.5])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_reencode_changes_at_most_the_allowed_fraction(fraction, temperature):
    scheme = AqlmScheme(2, 5, 4)
    codes, codebooks, scales = random_weight(32, 64, scheme, seed=1)
    reference = torch.randn(32, 64, generator=torch.Generator().manual_seed(2)) * 3
    total = codes.shape[0] * codes.shape[1]
    result = reencode_codes(reference, codes, codebooks, scales, max_change_fraction=fraction,
                            selection_temperature=temperature, generator=torch.Generator().manual_seed(0))
    changed = torch.ne(result.codes, codes).any(-1)
    assert result.allowed_groups == math.ceil(fraction * total)
    assert 0 < int(changed.sum()) <= result.allowed_groups
    assert result.changed_groups == int(changed.sum())
    assert result.codes.dtype == codes.dtype and result.codes.shape == codes.shape
    before = (reference - dequantize(codes, codebooks, scales)).square().sum()
    after = (reference - dequantize(result.codes, codebooks, scales)).square().sum()
    assert after < before


def test_reencode_picks_the_groups_farthest_from_the_reference():
    scheme = AqlmScheme(1, 4, 4)
    codes, codebooks, scales = random_weight(8, 16, scheme, seed=3)
    reference = dequantize(codes, codebooks, scales).clone()
    reference[2, 4:8] += 10.0  # group (2, 1)
    reference[5, 12:16] -= 7.0  # group (5, 3)
    result = reencode_codes(reference, codes, codebooks, scales, max_change_fraction=2 / 32)
    changed = torch.ne(result.codes, codes).any(-1).nonzero().tolist()
    assert changed and set(map(tuple, changed)) <= {(2, 1), (5, 3)}


def test_selection_is_sorted_or_sampled_by_priority():
    priority = torch.tensor([[0.0, 9.0, 1.0], [4.0, 0.0, 16.0]])
    assert select_code_groups(priority, 0.5).tolist() == [5, 1, 3]
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6)
    for _ in range(200):
        counts[select_code_groups(priority, 1 / 6, temperature=1.0, generator=generator)] += 1
    assert counts[[0, 4]].sum() == 0  # zero priority is never drawn while others remain
    assert counts[5] > counts[1] > counts[2]


@pytest.mark.parametrize("start", ["random", "true"])
def test_reencoding_a_representable_weight_returns_its_codes_one_codebook(start):
    scheme = AqlmScheme(1, 6, 8)
    codes, codebooks, scales = random_weight(16, 64, scheme, seed=4)
    reference = dequantize(codes, codebooks, scales)
    initial = codes if start == "true" else random_weight(16, 64, scheme, seed=5)[0]
    result = reencode_codes(reference, initial, codebooks, scales, max_change_fraction=1.0)
    assert torch.equal(result.codes, codes)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_reencoding_a_representable_weight_keeps_its_codes_two_codebooks(beam_size):
    scheme = AqlmScheme(2, 5, 4)
    codes, codebooks, scales = random_weight(16, 32, scheme, seed=6)
    reference = dequantize(codes, codebooks, scales)
    result = reencode_codes(reference, codes, codebooks, scales, max_change_fraction=1.0, beam_size=beam_size)
    assert torch.equal(result.codes, codes) and result.changed_groups == 0


def test_trust_ratio_bounds_the_weight_change():
    scheme = AqlmScheme(1, 5, 4)
    codes, codebooks, scales = random_weight(32, 32, scheme, seed=7)
    before = dequantize(codes, codebooks, scales)
    reference = before + torch.randn(32, 32, generator=torch.Generator().manual_seed(8))
    free = reencode_codes(reference, codes, codebooks, scales, max_change_fraction=1.0)
    bounded = reencode_codes(reference, codes, codebooks, scales, max_change_fraction=1.0, trust_ratio=0.05)
    change = (dequantize(bounded.codes, codebooks, scales) - before).norm()
    assert 1 <= bounded.changed_groups < free.changed_groups
    # the cumulative change stays within the trust region, except for at most the one extra group allowed
    group_changes = (dequantize(bounded.codes, codebooks, scales) - before).view(32, 8, 4).square().sum(-1)
    assert change**2 - group_changes.max() <= (0.05 * before.norm()) ** 2 + 1e-4


@pytest.mark.parametrize("trust_ratio", [None, 0.05])
def test_reencode_returns_the_exact_weight_of_its_codes(trust_ratio):
    codes, codebooks, scales = random_weight(32, 32, AqlmScheme(2, 4, 4), seed=12)
    reference = dequantize(codes, codebooks, scales) + torch.randn(32, 32, generator=torch.Generator().manual_seed(13))
    result = reencode_codes(reference, codes, codebooks, scales, max_change_fraction=0.5, trust_ratio=trust_ratio)
    assert result.changed_groups > 0 and result.weight.dtype == torch.float32
    assert torch.equal(result.weight, dequantize(result.codes, codebooks, scales).float())


def test_reencode_rejects_bad_arguments():
    codes, codebooks, scales = random_weight(8, 16, AqlmScheme(1, 4, 4), seed=9)
    reference = dequantize(codes, codebooks, scales)
    with pytest.raises(ValueError, match="max_code_change_per_step"):
        reencode_codes(reference, codes, codebooks, scales, max_change_fraction=0.0)
    with pytest.raises(ValueError, match="shape"):
        reencode_codes(reference[:4], codes, codebooks, scales)
    with pytest.raises(ValueError, match="NaN"):
        reencode_codes(reference * float("nan"), codes, codebooks, scales)
    with pytest.raises(ValueError, match="trust_ratio"):
        reencode_codes(reference, codes, codebooks, scales, trust_ratio=0.0)


# ---- optimizer and V-step variants ------------------------------------------------------------


def single_layer_problem(delta_decay: float, **overrides):
    """One quantized layer trained to map x to y = x @ W_target.T; returns (optimizer, entry, closure)."""
    scheme = AqlmScheme(1, 5, 4)
    codes, codebooks, scales = random_weight(16, 32, scheme, seed=10)
    quantized = QuantizedLinear.from_parts(codes, codebooks, scales)
    linear = nn.Linear(32, 16, bias=False)
    entry = QuantizedEntry("layer", linear, quantized)
    settings = dict(delta_decay=delta_decay, code_lr=0.5, lamb=False, max_code_change_per_step=0.25,
                    update_codebooks_and_scales=False)
    settings.update(overrides)
    optimizer = PVOptimizer([entry], {}, PVConfig(**settings))
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(64, 32, generator=generator)
    target = torch.randn(16, 32, generator=generator)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (linear(x) - x @ target.T).square().mean()
        loss.backward()
        return loss.detach()

    return optimizer, entry, closure


@pytest.mark.parametrize("overrides", [dict(delta_decay=0.3, code_trust_ratio=0.05), dict(delta_decay=1.0)])
def test_a_v_step_dequantizes_each_layer_twice(monkeypatch, overrides):
    from aqlm.pv_tuning import optim, reencode

    optimizer, entry, closure = single_layer_problem(**overrides)
    calls = []
    for module in (optim, reencode):
        real = module.dequantize
        monkeypatch.setattr(module, "dequantize", lambda *args, real=real: calls.append(1) or real(*args))
    closure()
    assert optimizer.step().changed_groups > 0
    assert len(calls) == 2  # the previous and the new weight
    torch.testing.assert_close(entry.linear.weight.detach(), entry.quantized_weight(), rtol=0, atol=0)


def test_direct_v_step_has_no_straight_through_buffers():
    optimizer, entry, closure = single_layer_problem(delta_decay=1.0)
    assert optimizer.buffers == {}
    codes_group = [g for g in optimizer.optimizer.param_groups if g["role"] == "codes"][0]
    assert codes_group["params"][0] is entry.linear.weight  # the de-quantized weight itself is optimized
    before = entry.quantized.codes.clone()
    closure()
    stats = optimizer.step()
    assert stats.changed_groups > 0 and not torch.equal(before, entry.quantized.codes)
    torch.testing.assert_close(entry.linear.weight.detach(), entry.quantized_weight(), rtol=0, atol=0)


def test_straight_through_buffer_accumulates_updates():
    optimizer, entry, closure = single_layer_problem(delta_decay=0.0)
    (buffer,) = optimizer.buffers.values()
    codes_group = [g for g in optimizer.optimizer.param_groups if g["role"] == "codes"][0]
    assert codes_group["params"][0] is buffer
    assert all(p is not entry.linear.weight for g in optimizer.optimizer.param_groups for p in g["params"])
    torch.testing.assert_close(buffer.detach(), entry.quantized_weight())
    for _ in range(3):
        closure()
        optimizer.step()
    # the buffer keeps its continuous value, away from the quantized weight the model uses
    assert (buffer.detach() - entry.quantized_weight()).norm() > 1e-3
    torch.testing.assert_close(entry.linear.weight.detach(), entry.quantized_weight(), rtol=0, atol=0)


def test_penalized_straight_through_pulls_the_buffer_to_the_quantized_weight():
    delta_decay = 0.3
    optimizer, entry, closure = single_layer_problem(delta_decay=delta_decay)
    (buffer,) = optimizer.buffers.values()
    closure()
    shadow = nn.Parameter(buffer.detach().clone())
    shadow.grad = entry.linear.weight.grad.clone()
    group = [g for g in optimizer.optimizer.param_groups if g["role"] == "codes"][0]
    settings = ("lr", "betas", "eps", "weight_decay", "debias", "amsgrad", "lamb")
    AdamLamb([shadow], **{key: group[key] for key in settings}).step()
    optimizer.step()
    expected = delta_decay * entry.quantized_weight() + (1 - delta_decay) * shadow.detach()
    torch.testing.assert_close(buffer.detach(), expected)


def test_direct_and_straight_through_agree_on_step_one_and_then_diverge():
    """Step 1 is the same (the buffer starts at the quantized weight); afterwards the direct variant
    restarts from the re-encoded weight while straight-through keeps the sub-threshold progress."""
    runs = {}
    for delta_decay in (1.0, 0.0):
        optimizer, entry, closure = single_layer_problem(delta_decay=delta_decay)
        history = []
        for _ in range(6):
            closure()
            optimizer.step()
            history.append(entry.quantized.codes.clone())
        runs[delta_decay] = history
    assert torch.equal(runs[1.0][0], runs[0.0][0])
    assert any(not torch.equal(a, b) for a, b in zip(runs[1.0], runs[0.0]))


def test_small_steps_change_codes_only_through_straight_through_buffers():
    """Updates smaller than the distance between codewords are rounded away by the direct variant every
    step; the straight-through buffer accumulates them until codes flip (the paper's motivation)."""
    changed, losses = {}, {}
    for delta_decay in (1.0, 0.0):
        optimizer, entry, closure = single_layer_problem(delta_decay=delta_decay, code_lr=0.1)
        changed[delta_decay], losses[delta_decay] = 0, []
        for _ in range(6):
            losses[delta_decay].append(float(closure()))
            changed[delta_decay] += optimizer.step().changed_groups
    assert changed[1.0] == 0 and losses[1.0][-1] == losses[1.0][0]
    assert changed[0.0] > 0 and losses[0.0][-1] < losses[0.0][0]


def test_p_only_keeps_codes_and_trains_codebooks_and_scales():
    optimizer, entry, closure = single_layer_problem(delta_decay=0.0, update_codes=False,
                                                     update_codebooks_and_scales=True, lr=1e-2)
    codes, codebooks = entry.quantized.codes.clone(), entry.quantized.codebooks.detach().clone()
    losses = []
    for _ in range(5):
        losses.append(float(closure()))
        stats = optimizer.step()
        assert stats.changed_groups == 0
    assert torch.equal(entry.quantized.codes, codes)
    assert not torch.equal(entry.quantized.codebooks.detach(), codebooks)
    assert optimizer.buffers == {} and losses[-1] < losses[0]


def test_adam_matches_torch_adam():
    generator = torch.Generator().manual_seed(12)
    a = nn.Parameter(torch.randn(5, 3, generator=generator))
    b = nn.Parameter(a.detach().clone())
    ours = AdamLamb([a], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    reference = torch.optim.Adam([b], lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for _ in range(4):
        grad = torch.randn(5, 3, generator=generator)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(a.detach(), b.detach())


def test_lamb_step_has_relative_size_lr():
    parameter = nn.Parameter(torch.randn(64, 64))
    start = parameter.detach().clone()
    parameter.grad = torch.randn(64, 64)
    AdamLamb([parameter], lr=1e-2, betas=(0.0, 0.95), lamb=True, debias=False).step()
    assert (parameter.detach() - start).norm() / start.norm() == pytest.approx(1e-2, rel=1e-4)


# ---- loss ------------------------------------------------------------------------------------


def test_chunked_loss_and_gradients_match_the_full_kl(monkeypatch):
    teacher, student = small_llama(seed=0), small_llama(seed=1)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))

    def full():
        log_q = F.log_softmax(student(ids).logits, -1)
        with torch.no_grad():
            log_p = F.log_softmax(teacher(ids).logits, -1)
        return F.kl_div(log_q.flatten(0, 1), log_p.flatten(0, 1), log_target=True, reduction="sum")

    expected = full()
    expected.backward()
    expected_grad = student.lm_head.weight.grad.clone()
    student.zero_grad()
    monkeypatch.setattr(pv_loss, "LOSS_CHUNK_ELEMENTS", 5 * 2 * VOCAB)  # five positions per chunk
    got = distillation_loss_sum(student.model(ids)[0], teacher.model(ids)[0].detach(), student.lm_head, teacher.lm_head)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.lm_head.weight.grad, expected_grad, rtol=1e-4, atol=1e-6)


def test_evaluation_matches_the_package_metrics():
    from aqlm.evaluate import kl_divergence, perplexity

    teacher, student = small_llama(seed=0), small_llama(seed=1)
    windows = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    result = evaluate_student(student, teacher, windows, batch_size=2)
    assert result.perplexity == pytest.approx(perplexity(student, windows.reshape(-1), 20, progress=False), rel=1e-5)
    assert result.kl == pytest.approx(kl_divergence(student, teacher, windows, progress=False), rel=1e-5)


def test_a_pv_step_decreases_the_loss_on_a_fixed_batch():
    teacher = small_llama(seed=0)
    student = quantize_linears(small_llama(seed=0), AqlmScheme(2, 4, 4), dtype=torch.float32)
    entries, non_quantized = dequantized_student(student)
    optimizer = PVOptimizer(entries, non_quantized, PVConfig(lr=1e-2, code_lr=0.3, max_code_change_per_step=0.05))
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        teacher_hidden = teacher.model(ids)[0]
    losses, changed = [], 0
    for _ in range(4):
        optimizer.zero_grad()
        loss_sum = distillation_loss_sum(student.model(ids)[0], teacher_hidden, student.lm_head, teacher.lm_head)
        loss = loss_sum / ids.numel()
        loss.backward()
        changed += optimizer.step().changed_groups
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] and changed > 0


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("enable", ["gradient_checkpointing_enable", "set_checkpointing"])
def test_gradient_checkpointing_gives_the_same_gradients(enable):
    """Transformers' block checkpointing works with QuantizedLinear (codebook gradients unchanged)."""
    def codebook_grads(checkpointing: bool) -> list[torch.Tensor]:
        model = quantize_linears(small_llama(seed=0), AqlmScheme(2, 4, 4), dtype=torch.float32)
        for module in model.modules():
            if isinstance(module, QuantizedLinear):
                module.codebooks.requires_grad_(True)
        model.train()
        if checkpointing and enable == "set_checkpointing":
            set_checkpointing(model, True)
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
        model(ids, use_cache=False).logits.square().mean().backward()
        return [m.codebooks.grad for m in model.modules() if isinstance(m, QuantizedLinear)]

    plain, checkpointed = codebook_grads(False), codebook_grads(True)
    assert all(g is not None and g.abs().sum() > 0 for g in checkpointed)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# ---- the training loop -----------------------------------------------------------------------


def test_pv_tune_saves_a_loadable_checkpoint(model_dirs, tmp_path):
    out = tmp_path / "out"
    records = []
    report = pv_tune(model_dirs["dense"], model_dirs["aqlm"], model_dirs["tokens"], out, fast_config(),
                     progress=False, log=lambda line: None, callback=records.append)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [e["step"] for e in report.evaluations] == [0, 2, 4]
    assert sum(r["codes_changed"] for r in report.steps) > 0
    assert (out / REPORT_FILE).is_file() and not (out / CHECKPOINT_DIR).exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert any(isinstance(m, QuantizedLinear) for m in loaded.modules())
    tuned = saved_tensors(out)
    assert tuned["model.layers.0.self_attn.q_proj.codebooks"].dtype == torch.float16  # as the student stored them
    teacher = AutoModelForCausalLM.from_pretrained(model_dirs["dense"])
    tokens = torch.load(model_dirs["tokens"])
    held_out = tokens[int(tokens.numel() * 0.9):][: 2 * 32].view(2, 32)
    result = evaluate_student(loaded, teacher, held_out)
    assert result.perplexity == pytest.approx(report.final["perplexity"], rel=1e-5)
    original = saved_tensors(model_dirs["aqlm"])
    name = "model.layers.0.mlp.up_proj"
    assert not torch.equal(original[f"{name}.codes"], tuned[f"{name}.codes"])
    assert json.loads((out / REPORT_FILE).read_text())["final"] == report.final


def test_p_only_tuning_leaves_codes_unchanged(model_dirs, tmp_path):
    report = pv_tune(model_dirs["dense"], model_dirs["aqlm"], model_dirs["tokens"], tmp_path / "p",
                     fast_config(update_codes=False, lr=1e-2, keep_best=False), progress=False, log=lambda line: None)
    original, tuned = saved_tensors(model_dirs["aqlm"]), saved_tensors(tmp_path / "p")
    codes = [k for k in original if k.endswith(".codes")]
    assert codes and all(torch.equal(original[k], tuned[k]) for k in codes)
    assert any(not torch.equal(original[k], tuned[k]) for k in original if k.endswith(".codebooks"))
    assert all(r["codes_changed"] == 0 for r in report.steps)


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_resume_gives_the_uninterrupted_result(model_dirs, tmp_path, interruption):
    config = fast_config(num_steps=5, save_every=2, eval_every=2, update_non_quantized_parameters=True,
                         code_selection_temperature=0.5, delta_decay=0.5)
    args = (model_dirs["dense"], model_dirs["aqlm"], model_dirs["tokens"])
    quiet = dict(progress=False, log=lambda line: None)
    reference = pv_tune(*args, tmp_path / "straight", config, **quiet)

    def stop_at_three(record):
        if record["step"] == 3:
            raise interruption("simulated interruption")

    with pytest.raises(interruption):
        pv_tune(*args, tmp_path / "resumed", config, callback=stop_at_three, **quiet)
    state = torch.load(tmp_path / "resumed" / CHECKPOINT_DIR / "state.pt", weights_only=True)
    assert state["step"] == (3 if interruption is KeyboardInterrupt else 2)
    with pytest.raises(FileExistsError, match="resume"):
        pv_tune(*args, tmp_path / "resumed", config, **quiet)
    resumed = pv_tune(*args, tmp_path / "resumed", config, resume=True, **quiet)
    assert resumed.total_seconds >= state["seconds"] + resumed.seconds > resumed.seconds  # both calls counted
    assert json.loads((tmp_path / "resumed" / "pv_report.json").read_text())["total_seconds"] == resumed.total_seconds
    assert reference.total_seconds == reference.seconds
    assert resumed.steps == reference.steps
    assert resumed.evaluations == reference.evaluations
    assert resumed.final == reference.final and resumed.best_step == reference.best_step
    straight, again = saved_tensors(tmp_path / "straight"), saved_tensors(tmp_path / "resumed")
    assert straight.keys() == again.keys()
    for key in straight:
        assert torch.equal(straight[key], again[key]), key


def test_resume_refuses_other_settings(model_dirs, tmp_path):
    args = (model_dirs["dense"], model_dirs["aqlm"], model_dirs["tokens"], tmp_path / "run")
    quiet = dict(progress=False, log=lambda line: None)

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pv_tune(*args, fast_config(), callback=stop, **quiet)
    with pytest.raises(ValueError, match="other settings.*config"):
        pv_tune(*args, fast_config(code_lr=0.5), resume=True, **quiet)


def test_bf16_autocast_and_gradient_checkpointing_run(model_dirs, tmp_path):
    config = fast_config(num_steps=2, eval_every=0, save_every=0, bf16=True, gradient_checkpointing=True,
                         microbatch_size=2)
    report = pv_tune(model_dirs["dense"], model_dirs["aqlm"], model_dirs["tokens"], tmp_path / "bf16", config,
                     progress=False, log=lambda line: None)
    assert len(report.steps) == 2 and all(math.isfinite(r["loss"]) for r in report.steps)


# ---- errors ----------------------------------------------------------------------------------


def test_errors_name_the_problem(model_dirs, tmp_path):
    dense, aqlm, tokens = model_dirs["dense"], model_dirs["aqlm"], model_dirs["tokens"]
    quiet = dict(progress=False, log=lambda line: None)
    with pytest.raises(FileNotFoundError, match="dense model directory"):
        pv_tune(tmp_path / "missing", aqlm, tokens, tmp_path / "a", fast_config(), **quiet)
    with pytest.raises(FileNotFoundError, match="quantized model directory"):
        pv_tune(dense, tmp_path / "missing", tokens, tmp_path / "a", fast_config(), **quiet)
    with pytest.raises(ValueError, match="not quantized.*AQLM checkpoint"):
        pv_tune(dense, dense, tokens, tmp_path / "a", fast_config(), **quiet)
    with pytest.raises(ValueError, match="is the quantized model directory"):
        pv_tune(dense, aqlm, tokens, aqlm, fast_config(), **quiet)
    other = small_llama(seed=3, hidden=48)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="do not match: hidden_size"):
        pv_tune(tmp_path / "other", aqlm, tokens, tmp_path / "a", fast_config(), **quiet)
    torch.save(torch.arange(20) % VOCAB, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="too few tokens"):
        pv_tune(dense, aqlm, tmp_path / "short.pt", tmp_path / "a", fast_config(), **quiet)
    torch.save(torch.full((500,), VOCAB + 5), tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="vocabulary"):
        pv_tune(dense, aqlm, tmp_path / "bad.pt", tmp_path / "a", fast_config(), **quiet)
    with pytest.raises(FileNotFoundError, match="no such token or text file"):
        pv_tune(dense, aqlm, tmp_path / "nothing.pt", tmp_path / "a", fast_config(), **quiet)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        pv_tune(dense, aqlm, tokens, tmp_path / "full", fast_config(), **quiet)


def test_nan_loss_is_reported(model_dirs, tmp_path, monkeypatch):
    from aqlm.pv_tuning import train

    real = train.distillation_loss_sum
    monkeypatch.setattr(train, "distillation_loss_sum", lambda *args: real(*args) * float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        pv_tune(model_dirs["dense"], model_dirs["aqlm"], model_dirs["tokens"], tmp_path / "nan", fast_config(),
                progress=False, log=lambda line: None)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(delta_decay=1.5), "delta_decay"),
        (dict(max_code_change_per_step=0.0), "max_code_change_per_step"),
        (dict(update_codes=False, update_codebooks_and_scales=False), "nothing to train"),
        (dict(microbatch_size=4, batch_size=2), "microbatch_size"),
        (dict(code_beta2=1.0), "code_beta2"),
        (dict(select_by="loss"), "select_by"),
    ],
)
def test_bad_config_is_rejected(settings, message):
    with pytest.raises(ValueError, match=message):
        PVConfig(**settings)


def test_loading_a_dense_model_as_student_fails(model_dirs):
    with pytest.raises(ValueError, match="AQLM checkpoint"):
        load_student(model_dirs["dense"])


# ---- command line ----------------------------------------------------------------------------


def test_cli_runs_finetune(model_dirs, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args([
        "--base", str(model_dirs["dense"]), "--quantized", str(model_dirs["aqlm"]),
        "--dataset", str(model_dirs["tokens"]), "--out", str(out), "--steps", "2", "--batch-size", "2",
        "--nsamples", "4", "--seqlen", "32", "--eval-windows", "2", "--delta-decay", "1", "--adam",
        "--code-lr", "0.01", "--no-progress",
    ])
    config = cli.config_from_args(args)
    assert config.delta_decay == 1.0 and config.lamb is False and config.num_steps == 2
    assert cli.run(args) == 0
    assert "tuning, 2 steps" in capsys.readouterr().out
    assert (out / "config.json").is_file()


# ---- notebook --------------------------------------------------------------------------------


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(REPO / "notebooks" / "pv_tuning.ipynb", as_version=4)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(notebook, timeout=1200, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )
    assert "PV beats P-only" in outputs


def test_p_only_fingerprint_ignores_the_v_step_settings():
    """A P-only run resumes whatever its V-step settings say (they change nothing); a PV run does not."""
    p_only = PVConfig(update_codes=False)
    assert PVConfig(update_codes=False, code_lr=0.3, beam_size=4).fingerprint() == p_only.fingerprint()
    assert PVConfig(update_codes=False, lr=1e-2).fingerprint() != p_only.fingerprint()
    assert PVConfig(code_lr=0.3).fingerprint() != PVConfig().fingerprint()
