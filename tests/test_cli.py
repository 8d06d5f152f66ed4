"""The command line and the library never damage data, and report a user's mistakes in one line."""
import hashlib
import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from aqlm import QuantizedLinear
from aqlm.cli import build_parser, main
from aqlm.quantize import quantize_model
from test_quantize_model import config, tiny_model_dir, token_file


def digests(directory: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """``python -m aqlm ARGV`` in this process: (exit status, stderr)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def assert_one_line(status: int, stderr: str, *fragments: str) -> None:
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got: {stderr!r}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


@pytest.fixture
def dense(tmp_path) -> tuple[Path, Path]:
    return tiny_model_dir(tmp_path), token_file(tmp_path)


QUICK = ["--scheme", "2x4g8", "--nsamples", "2", "--seqlen", "16", "--max-epochs", "1", "--steps-per-epoch", "2",
         "--init-max-iter", "2", "--finetune-max-epochs", "0", "--codebook-update", "lstsq", "--no-progress"]


def test_quantize_refuses_to_write_into_the_input_model(dense, capsys):
    model_dir, tokens = dense
    before = digests(model_dir)
    status, stderr = run_cli(capsys, "quantize", model_dir, "--dataset", tokens, "--out", model_dir, *QUICK)
    assert_one_line(status, stderr, "is the input model directory")
    status, stderr = run_cli(capsys, "quantize", model_dir, "--dataset", tokens, "--out", model_dir, "--overwrite", *QUICK)
    assert_one_line(status, stderr, "is the input model directory")
    assert digests(model_dir) == before


def test_quantize_refuses_a_non_empty_out_unless_told(dense, tmp_path, capsys):
    model_dir, tokens = dense
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    status, stderr = run_cli(capsys, "quantize", model_dir, "--dataset", tokens, "--out", out, *QUICK)
    assert_one_line(status, stderr, "is not empty (notes.txt)", "--resume", "--overwrite")
    status, stderr = run_cli(capsys, "quantize", model_dir, "--dataset", tokens, "--out", out, "--resume", *QUICK)
    assert_one_line(status, stderr, "holds no run to resume")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert main([str(a) for a in ("quantize", model_dir, "--dataset", tokens, "--out", out, "--overwrite", *QUICK)]) == 0
    assert (out / "notes.txt").read_text() == "mine", "--overwrite writes into the directory, it does not empty it"
    assert (out / "model.safetensors").is_file()
    capsys.readouterr()
    status, stderr = run_cli(capsys, "quantize", model_dir, "--dataset", tokens, "--out", out, *QUICK)
    assert_one_line(status, stderr, "is not empty")


def test_out_that_is_a_file_is_refused(dense, tmp_path, capsys):
    model_dir, tokens = dense
    target = tmp_path / "a-file"
    target.write_text("keep")
    for argv in (
        ("quantize", model_dir, "--dataset", tokens, "--out", target, *QUICK),
        ("demo", "--out", target),
        ("finetune", "--base", model_dir, "--quantized", model_dir, "--dataset", tokens, "--out", target),
    ):
        status, stderr = run_cli(capsys, *argv)
        assert status == 2 and len(stderr.strip().splitlines()) == 1, stderr
        assert "is a file" in stderr or "is not quantized" in stderr
    assert target.read_text() == "keep"


@pytest.mark.parametrize("command", ["quantize", "demo"])
def test_a_bad_out_is_refused_before_a_bundled_model_is_converted(command, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AQLM_CACHE_DIR", str(tmp_path / "cache"))
    target = tmp_path / "a-file"
    target.write_text("keep")
    if command == "quantize":
        argv = ("quantize", "stories260k", "--dataset", tmp_path / "tokens.pt", "--out", target, *QUICK)
    else:
        argv = ("demo", "--model", "stories260k", "--out", target)
    status, stderr = run_cli(capsys, *argv)
    assert_one_line(status, stderr, "is a file")
    assert not (tmp_path / "cache" / "models").exists(), "the model was converted before --out was checked"


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["quantize", "M", "--dataset", "D", "--out", "O", "--threads", "-2"], ["--threads", ">= 1, got -2"]),
        (["quantize", "M", "--dataset", "D", "--out", "O", "--threads", "0"], ["--threads", ">= 1, got 0"]),
        (["eval", "M", "--dataset", "D", "--seqlen", "0"], ["--seqlen", ">= 2, got 0"]),
        (["eval", "M", "--dataset", "D", "--threads", "x"], ["--threads", "expected an integer, got 'x'"]),
        (["quantize", "M", "--dataset", "D", "--out", "O", "--scheme", "300x4g4"], ["--scheme", "num_codebooks", "300"]),
        (["quantize", "M", "--dataset", "D", "--out", "O", "--scheme", "99999x4g4"], ["--scheme", "99999"]),
        (["quantize", "M", "--dataset", "D", "--out", "O", "--scheme", "2x17g8"], ["--scheme", "nbits_per_codebook"]),
        (["quantize", "M", "--dataset", "D", "--out", "O", "--scheme", "1x8g2048o1024"], ["--scheme", "fewer than"]),
        (["quantize", "M", "--dataset", "D", "--out", "O", "--scheme", "two"], ["--scheme", "cannot parse"]),
        (["demo", "--scheme", "300x4g4"], ["--scheme", "num_codebooks"]),
        (["finetune", "--base", "B", "--quantized", "Q", "--dataset", "D", "--out", "O", "--threads", "0"],
         ["--threads", ">= 1, got 0"]),
    ],
)
def test_bad_values_are_refused_while_parsing(argv, fragments, capsys):
    """Only the parser runs: a value it lets through would start real work (300 codebooks hung)."""
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert_one_line(exit_.value.code, capsys.readouterr().err, *fragments)


def test_no_traceback_from_the_command_line(tmp_path):
    for argv in (["eval", str(tmp_path), "--dataset", "x", "--seqlen", "0"],
                 ["quantize", str(tmp_path / "nope"), "--dataset", "x", "--out", str(tmp_path / "o")]):
        result = subprocess.run([sys.executable, "-m", "aqlm", *argv], capture_output=True, text=True)
        assert result.returncode == 2
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_finetune_refuses_a_non_empty_out(dense, tmp_path, capsys):
    model_dir, tokens = dense
    quantized = tmp_path / "q"
    quantize_model(model_dir, tokens, quantized, config(), progress=False, log=lambda line: None)
    capsys.readouterr()
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    base = ["finetune", "--base", model_dir, "--quantized", quantized, "--dataset", tokens, "--steps", "1",
            "--nsamples", "2", "--seqlen", "16", "--batch-size", "1", "--microbatch-size", "1", "--no-progress"]
    status, stderr = run_cli(capsys, *base, "--out", out)
    assert_one_line(status, stderr, "is not empty (notes.txt)")
    status, stderr = run_cli(capsys, *base, "--out", quantized)
    assert_one_line(status, stderr, "is the quantized model directory")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


# ---- the checkpoint that quantize writes ---------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint")
    model_dir, tokens = tiny_model_dir(root), token_file(root)
    report = quantize_model(model_dir, tokens, root / "q", config(), progress=False, log=lambda line: None)
    return model_dir, root / "q", report


def test_checkpoint_files_are_readable_by_others(checkpoint):
    _, out, _ = checkpoint
    for path in out.rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, f"{path} is not readable by group and others"


def test_non_quantized_parameters_are_stored_in_float16(checkpoint):
    model_dir, out, report = checkpoint
    tensors = load_file(out / "model.safetensors")
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float16, f"{name} stored as {tensor.dtype}"
    size = (out / "model.safetensors").stat().st_size
    assert report.checkpoint_bytes == size
    assert f"checkpoint {size / 2**20:.1f} MiB on disk" in report.summary()
    assert json.loads((out / "quantization_report.json").read_text())["checkpoint_bytes"] == size
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32, "the model is still built in float32"
    dense = AutoModelForCausalLM.from_pretrained(model_dir)
    assert torch.equal(loaded.model.embed_tokens.weight, dense.model.embed_tokens.weight.half().float())


@pytest.mark.parametrize("tensor", ["codes", "codebooks", "scales"])
def test_checkpoint_missing_an_aqlm_tensor_fails_to_load_with_its_name(checkpoint, tmp_path, tensor):
    _, out, _ = checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in out.iterdir():
        if path.is_file():
            (broken / path.name).write_bytes(path.read_bytes())
    tensors = load_file(out / "model.safetensors")
    name = f"model.layers.1.mlp.down_proj.{tensor}"
    del tensors[name]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"lacks tensors that the model needs: {name}$"):
        AutoModelForCausalLM.from_pretrained(broken)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14


def test_tied_embedding_is_stored_once_in_the_storage_dtype(tmp_path, monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM


    from aqlm import AqlmScheme, save_quantized
    from aqlm.calibration import find_linears, get_blocks
    from aqlm.quantize.layer import LayerConfig, init_quantized_weight

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)).eval()
    layer_config = LayerConfig(scheme=AqlmScheme(1, 8, 8, 1), init_max_iter=2)
    for block in get_blocks(model):
        for name, linear in find_linears(block).items():
            block.set_submodule(name, QuantizedLinear.from_parts(*init_quantized_weight(linear.weight.detach(), layer_config)))
    save_quantized(model, tmp_path / "q", storage_dtype=torch.float16)
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].dtype == torch.float16
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=2e-3)


def test_eval_runs_in_float32_and_bfloat16(checkpoint, tmp_path, capsys):
    """``eval --dtype``: the model's float parameters and activations in that dtype, reported with
    the result; bfloat16 moves the perplexity by rounding only."""
    _, out, _ = checkpoint
    tokens = token_file(tmp_path)
    results = {}
    for dtype in ("float32", "bfloat16"):
        status = main(["eval", str(out), "--dataset", str(tokens), "--seqlen", "16", "--max-windows", "4",
                       "--dtype", dtype])
        assert status == 0
        results[dtype] = json.loads(capsys.readouterr().out)
        assert results[dtype]["dtype"] == dtype and results[dtype]["windows"] == 4
    assert results["float32"]["perplexity"] != results["bfloat16"]["perplexity"]  # really ran in bfloat16
    assert results["bfloat16"]["perplexity"] == pytest.approx(results["float32"]["perplexity"], rel=0.05)
    status, stderr = run_cli(capsys, "eval", str(out), "--dataset", str(tokens), "--dtype", "float16")
    assert_one_line(status, stderr, "--dtype", "float16")
