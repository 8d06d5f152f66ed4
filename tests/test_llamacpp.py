"""llama.cpp baseline plumbing: bits of a GGUF's block linears, tool lookup and commands, and (when
llama-cpp-python is installed) perplexity of a GGUF through this package's own evaluation code."""
from __future__ import annotations

import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aqlm import llamacpp


def _write_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    weight = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    q8 = gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.ffn_down.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.1.ffn_down.weight", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_q.weight", weight)
    writer.add_tensor("blk.0.attn_norm.weight", weight[0])
    writer.add_tensor("token_embd.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_bits_count_only_the_block_linears_as_stored(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_gguf(path)
    bits, types = llamacpp.gguf_linear_bits(path)
    # Q8_0 stores 32 weights in 34 bytes (8.5 bits); F32 is 32 bits; norms and embeddings are not counted.
    assert bits == pytest.approx((2 * 512 * 8.5 + 512 * 32) / (3 * 512))
    assert types == {"attn_q": {"F32": 1}, "ffn_down": {"Q8_0": 2}}
    assert llamacpp.describe_types(types) == "attn_q F32x1; ffn_down Q8_0x2"


def test_a_gguf_without_block_linears_is_refused(tmp_path):
    import gguf

    path = tmp_path / "empty.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="no transformer-block linear tensors"):
        llamacpp.gguf_linear_bits(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        llamacpp.gguf_linear_bits(tmp_path / "absent.gguf")


def _fake_tool(directory: Path, name: str) -> Path:
    """A stand-in for a llama.cpp tool: records its arguments, writes the file after -o or the 2nd-to-last
    positional (llama-quantize's output)."""
    tool = directory / name
    tool.write_text(
        f"#!{sys.executable}\n"
        "import sys, pathlib\n"
        "args = sys.argv[1:]\n"
        "pathlib.Path(__file__).with_suffix('.args').write_text(' '.join(args))\n"
        "out = args[args.index('-o') + 1] if '-o' in args else args[-3]\n"
        "pathlib.Path(out).write_text('gguf')\n"
    )
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    return tool


def test_tools_are_found_in_the_environment_directory_and_missing_ones_named(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.BIN_ENV, str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    with pytest.raises(llamacpp.LlamaCppUnavailable, match="llama-quantize.*scripts/build_llamacpp.py"):
        llamacpp.find_tool("llama-quantize")
    tool = _fake_tool(tmp_path, "llama-quantize")
    assert llamacpp.find_tool("llama-quantize") == tool


def test_quantize_and_imatrix_commands(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.BIN_ENV, str(tmp_path))
    _fake_tool(tmp_path, "llama-quantize")
    _fake_tool(tmp_path, "llama-imatrix")
    source = tmp_path / "source.gguf"
    source.write_text("source")
    imatrix = llamacpp.make_imatrix(source, tmp_path / "calib.txt", tmp_path / "imatrix.gguf", chunks=7, threads=2)
    assert imatrix.read_text() == "gguf"
    assert "--chunks 7" in (tmp_path / "llama-imatrix.args").read_text()
    out = llamacpp.quantize_gguf(source, tmp_path / "IQ2_XS.gguf", "IQ2_XS", imatrix, threads=2)
    assert out.read_text() == "gguf"
    assert (tmp_path / "llama-quantize.args").read_text() == (
        f"--allow-requantize --imatrix {imatrix} {source} {tmp_path / 'IQ2_XS.gguf.partial.gguf'} IQ2_XS 2"
    )
    (tmp_path / "llama-quantize.args").unlink()
    llamacpp.quantize_gguf(source, tmp_path / "IQ2_XS.gguf", "IQ2_XS", imatrix)  # kept: not run again
    assert not (tmp_path / "llama-quantize.args").exists()


def test_a_failing_tool_names_its_command(tmp_path, monkeypatch):
    monkeypatch.setenv(llamacpp.BIN_ENV, str(tmp_path))
    tool = tmp_path / "llama-quantize"
    tool.write_text(f"#!{sys.executable}\nimport sys\nprint('unknown type BOGUS', file=sys.stderr)\nsys.exit(3)\n")
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(RuntimeError, match=r"(?s)llama-quantize to BOGUS failed \(exit 3\).*unknown type BOGUS"):
        llamacpp.quantize_gguf(tmp_path / "in.gguf", tmp_path / "out.gguf", "BOGUS")
    assert not (tmp_path / "out.gguf").exists()


def test_llamacpp_perplexity_matches_the_dense_model():
    """The Q4_1 GGUF through llama.cpp and its float32 de-quantization through Transformers score the
    same windows alike (llama.cpp computes in its own order and precision, so not exactly)."""
    from aqlm.cli import evaluate_model, load_model
    from aqlm.models.real import _find_smollm2_gguf, real_model_dir
    from aqlm.paths import data_file

    try:
        gguf_model = llamacpp.LlamaCppLM(_find_smollm2_gguf(), n_ctx=256, threads=torch.get_num_threads())
    except llamacpp.LlamaCppUnavailable as error:
        pytest.skip(str(error))
    model, tokenizer = load_model(real_model_dir("smollm2-135m"))
    dense = evaluate_model(model, tokenizer, data_file("wikitext-2", "test.txt"), 256, 2, progress=False)
    ours = evaluate_model(gguf_model, tokenizer, data_file("wikitext-2", "test.txt"), 256, 2, progress=False)
    assert ours["windows"] == dense["windows"] == 2
    assert ours["perplexity"] == pytest.approx(dense["perplexity"], rel=0.02)
    with pytest.raises(ValueError, match="exceed the context"):
        gguf_model(input_ids=torch.zeros(1, 300, dtype=torch.long))


def test_missing_llama_cpp_python_is_named(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(llamacpp.LlamaCppUnavailable, match=r"pip install 'aqlm\[llamacpp\]'"):
        llamacpp.LlamaCppLM(tmp_path / "model.gguf")

