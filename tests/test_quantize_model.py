"""Whole-model AQLM quantization: checkpoint, resume after a kill, errors on bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from aqlm import AqlmScheme, QuantizedLinear
from aqlm.quantize import FinetuneConfig, LayerConfig, QuantizeConfig, quantize_model

FAST = dict(max_epochs=2, steps_per_epoch=5, init_max_iter=5, codebook_update="lstsq")


def tiny_model_dir(tmp_path: Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path / f"dense{seed}"
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def token_file(tmp_path: Path, count: int = 4000, vocab: int = 96) -> Path:
    path = tmp_path / "tokens.pt"
    torch.save(torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(0)), path)
    return path


def config(scheme="2x4g8", **overrides) -> QuantizeConfig:
    return QuantizeConfig(
        layer=LayerConfig(scheme=AqlmScheme.parse(scheme), **FAST),
        finetune=FinetuneConfig(max_epochs=1, lr=1e-4),
        nsamples=4,
        seqlen=32,
        **overrides,
    )


def expected_bits_per_weight_2x4g8(hidden: int = 64) -> float:
    """Storage per weight of the linears of tiny_model_dir's Llama under 2x4g8 with float16
    codebooks and scales, counted by hand: q, o [hidden, hidden]; k, v [2 kv heads x 16, hidden];
    gate, up [2 hidden, hidden]; down [hidden, 2 hidden]. Per layer: one 4-bit code per 8 weights
    and codebook, two codebooks of 16 codewords x 8 values, one scale per output row (2.0 here)."""
    shapes = [(hidden, hidden), (32, hidden), (32, hidden), (hidden, hidden)]
    shapes += [(2 * hidden, hidden), (2 * hidden, hidden), (hidden, 2 * hidden)]
    bits = sum(out * inp // 8 * 2 * 4 + 2 * 16 * 8 * 16 + out * 16 for out, inp in shapes)
    return bits / sum(out * inp for out, inp in shapes)  # every block alike: the per-block average


def dense_with_saved_weights(dense: torch.nn.Module, checkpoint: Path) -> torch.nn.Module:
    """``dense`` with each quantized linear's weight replaced by the one its saved codes, codebooks and
    scales define, computed by the defining sum in float64 (codes read as unsigned 4-bit values),
    and the saved non-quantized parameters (float16 in the checkpoint)."""
    tensors = load_file(str(checkpoint / "model.safetensors"))
    state = {}
    for name, value in tensors.items():
        if name.endswith(".codes"):
            prefix = name[: -len(".codes")]
            codes = value.long() % 16  # [out, in / 8, 2]
            codebooks = tensors[f"{prefix}.codebooks"].double()  # [2, 16, 1, 8]
            scales = tensors[f"{prefix}.scales"].double().view(-1, 1)
            words = codebooks[0, codes[..., 0], 0] + codebooks[1, codes[..., 1], 0]  # [out, in / 8, 8]
            state[f"{prefix}.weight"] = (scales * words.flatten(1)).float()
        elif not name.endswith((".codebooks", ".scales")):
            state[name] = value.float()
    missing, unexpected = dense.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return dense


def test_quantized_checkpoint_loads_and_improves_on_initialisation(tmp_path, monkeypatch):
    model_dir, tokens = tiny_model_dir(tmp_path), token_file(tmp_path)
    report = quantize_model(model_dir, tokens, tmp_path / "q", config(val_size=2), progress=False, log=lambda line: None)
    assert len(report.layers) == 14
    assert all(layer.final_error <= layer.initial_error + 1e-9 for layer in report.layers)
    assert report.bits_per_weight == pytest.approx(expected_bits_per_weight_2x4g8(), rel=1e-12)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 14
    assert loaded.model.layers[0].self_attn.q_proj.codebooks.dtype in (torch.float16, torch.float32)
    written = json.loads((tmp_path / "q" / "quantization_report.json").read_text())
    assert written["bits_per_weight"] == pytest.approx(report.bits_per_weight)
    assert not list((tmp_path / "q" / "aqlm_progress").glob("block_*")), "per-block files are removed at the end"
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.randint(0, 96, (1, 16), generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("AQLM_QUANTIZED_LUT", "0")  # exact tables: the comparison below is to float rounding
    with torch.no_grad():
        got = loaded(ids).logits
        unquantized = dense(ids).logits
        expected = dense_with_saved_weights(dense, tmp_path / "q")(ids).logits
    # float32 rounding through two small blocks is ~1e-7 of the largest logit (measured 2e-7);
    # quantization itself moves the logits by tenths of it, so an error in any layer shows.
    atol = 1e-5 * float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=0, atol=atol)
    assert float((unquantized - expected).abs().max()) > 100 * atol, "the check must see quantization"


def test_existing_run_needs_resume_and_same_settings(tmp_path):
    model_dir, tokens = tiny_model_dir(tmp_path), token_file(tmp_path)
    out = tmp_path / "q"
    quantize_model(model_dir, tokens, out, config(), progress=False, log=lambda line: None)
    with pytest.raises(FileExistsError, match="--resume"):
        quantize_model(model_dir, tokens, out, config(), progress=False, log=lambda line: None)
    with pytest.raises(FileExistsError, match="holds a finished run .*nothing to resume"):
        quantize_model(model_dir, tokens, out, config(), resume=True, progress=False, log=lambda line: None)
    (out / "quantization_report.json").unlink()  # as if killed just before the report
    with pytest.raises(ValueError, match="other settings"):
        quantize_model(model_dir, tokens, out, config(seed=1), resume=True, progress=False, log=lambda line: None)


def _cli(model_dir, tokens, out, *extra):
    return [
        sys.executable, "-m", "aqlm", "quantize", str(model_dir), "--dataset", str(tokens), "--out", str(out),
        "--scheme", "2x4g8", "--nsamples", "6", "--seqlen", "32", "--max-epochs", "3", "--steps-per-epoch", "5",
        "--init-max-iter", "5", "--codebook-update", "lstsq", "--finetune-max-epochs", "1", "--finetune-lr", "1e-4",
        "--threads", "2", "--no-progress", *extra,
    ]


@pytest.mark.parametrize("precision", [(), ("--forward-dtype", "bfloat16", "--finetune-dtype", "bfloat16")],
                         ids=["float32", "bfloat16"])
def test_killed_run_resumes_to_the_same_result(tmp_path, precision):
    """Also with bfloat16 forward passes: a resumed run recomputes the restored blocks' outputs the same way."""
    model_dir, tokens = tiny_model_dir(tmp_path, layers=4, seed=1), token_file(tmp_path)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    reference = subprocess.run(_cli(model_dir, tokens, tmp_path / "whole", *precision), capture_output=True, text=True,
                               env=env)
    assert reference.returncode == 0, reference.stderr

    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli(model_dir, tokens, killed, *precision), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env)
    deadline = time.monotonic() + 300
    while not (killed / "aqlm_progress" / "block_0001.json").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never finished its second block"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists(), "killed before the end"
    restored = [json.loads(p.read_text()) for p in sorted((killed / "aqlm_progress").glob("block_*.json"))]
    assert 2 <= len(restored) < 4

    resumed = subprocess.run(_cli(model_dir, tokens, killed, *precision, "--resume"), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "restored" in resumed.stdout + resumed.stderr
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    again = load_file(str(killed / "model.safetensors"))
    assert whole.keys() == again.keys()
    for name in whole:
        assert torch.equal(whole[name], again[name]), f"{name} differs after resume"
    report = json.loads((killed / "quantization_report.json").read_text())
    assert report["total_seconds"] == pytest.approx(report["seconds"] + sum(r["seconds"] for r in restored))
    assert all(r["seconds"] > 0 for r in restored)


def test_bad_inputs_give_clear_errors(tmp_path):
    model_dir, tokens = tiny_model_dir(tmp_path), token_file(tmp_path)
    quiet = dict(progress=False, log=lambda line: None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        quantize_model(tmp_path / "missing", tokens, tmp_path / "q1", config(), **quiet)
    with pytest.raises(ValueError, match="in_group_size 7 does not divide in_features 64"):
        quantize_model(model_dir, tokens, tmp_path / "q2", config("1x4g7"), **quiet)
    short = tmp_path / "short.pt"
    torch.save(torch.arange(20), short)
    with pytest.raises(ValueError, match="20"):
        quantize_model(model_dir, short, tmp_path / "q3", config(), **quiet)
    with pytest.raises(ValueError, match="tokenizer"):
        text = tmp_path / "text.txt"
        text.write_text("no tokenizer for this model " * 100)
        quantize_model(model_dir, text, tmp_path / "q4", config(), **quiet)
    broken = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        broken.model.layers[1].mlp.up_proj.weight[3, 4] = float("nan")
    broken.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight contains NaN"):
        quantize_model(tmp_path / "nan", tokens, tmp_path / "q5", config(), **quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        quantize_model(tmp_path / "empty", tokens, tmp_path / "q6", config(), **quiet)


def test_unsupported_family_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=96)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="not supported.*llama, mistral, qwen2"):
        quantize_model(tmp_path / "gpt2", token_file(tmp_path), tmp_path / "q", config(), progress=False, log=lambda l: None)


def test_cli_reports_errors_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "aqlm", "quantize", str(tmp_path / "nope"), "--dataset", "x", "--out", str(tmp_path / "o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr


def test_linears_are_grouped_by_shared_input_in_execution_order(tmp_path):
    from aqlm.calibration import capture_block_inputs, get_blocks
    from aqlm.quantize.model import input_groups

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(tmp_path))
    inputs, kwargs = capture_block_inputs(model, torch.randint(0, 96, (2, 16)), progress=False)
    expected = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
    for _ in range(20):  # buffers freed during the forward pass must never merge two groups
        assert input_groups(get_blocks(model)[0], inputs[:1], kwargs) == expected


def test_demo_quantizes_the_bundled_model_and_prints_quality(tmp_path, capsys):
    from aqlm.cli import main
    from aqlm.models import RealModelUnavailable, stories260k_dir

    try:
        stories260k_dir()
    except RealModelUnavailable as error:
        pytest.skip(str(error))
    out = tmp_path / "demo"
    status = main(["demo", "--out", str(out), "--nsamples", "8", "--seqlen", "64", "--eval-sequences", "4",
                   "--threads", "1"])
    printed = capsys.readouterr().out
    assert status == 0
    rows = {line.split()[0]: line.split() for line in printed.splitlines() if line.startswith("  ") and line.split()}
    assert set(rows) >= {"dense", "RTN", "AQLM"}
    assert float(rows["dense"][-1]) == 0.0 and float(rows["AQLM"][-1]) > 0.0  # KL to dense
    assert float(rows["AQLM"][2]) <= float(rows["RTN"][3])  # AQLM's bits/weight within RTN's budget
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(module, QuantizedLinear) for module in model.modules()) == 35
    assert torch.load(out / "demo_samples.pt", weights_only=True).shape == (12, 64)
