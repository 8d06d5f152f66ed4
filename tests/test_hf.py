"""Hugging Face Transformers: save_pretrained / from_pretrained of AQLM checkpoints, ours and upstream's."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from aqlm import AqlmScheme, QuantizedLinear, save_quantized
from aqlm.calibration import find_linears, get_blocks
from aqlm.quantize.layer import LayerConfig, init_quantized_weight


def tiny_llama(tie: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def quantize_linears_nearest(model: nn.Module, scheme: AqlmScheme) -> None:
    """Replace every block linear by a QuantizedLinear from k-means codebooks (no calibration)."""
    config = LayerConfig(scheme=scheme, init_max_iter=5)
    for block in get_blocks(model):
        for name, linear in find_linears(block).items():
            codes, codebooks, scales = init_quantized_weight(linear.weight.detach(), config)
            bias = None if linear.bias is None else linear.bias.detach()
            block.set_submodule(name, QuantizedLinear.from_parts(codes, codebooks, scales, bias))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_round_trip_and_resave(tmp_path):
    model = tiny_llama()
    quantize_linears_nearest(model, AqlmScheme(2, 6, 8, 1))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    expected = logits(model, ids)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "aqlm" and config["num_codebooks"] == 2 and config["nbits_per_codebook"] == 6
    assert "lm_head" in config["linear_weights_not_to_quantize"]
    assert "lm_head.weight" in config["linear_weights_not_to_quantize"]
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert type(loaded.lm_head) is nn.Linear
    assert torch.equal(logits(loaded, ids), expected)
    loaded.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(logits(again, ids), expected)
    generated = again.generate(ids[:1, :4], max_new_tokens=6, do_sample=False)
    assert generated.shape == (1, 10)


def _write_upstream_layout(model, path):
    """A checkpoint as upstream AQLM writes it: only weight names in linear_weights_not_to_quantize."""
    save_quantized(model, path)
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["linear_weights_not_to_quantize"] = ["lm_head.weight"]
    config_path.write_text(json.dumps(config))


def test_upstream_layout_loads_with_dense_lm_head(tmp_path):
    model = tiny_llama()
    quantize_linears_nearest(model, AqlmScheme(1, 8, 8, 1))
    ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    expected = logits(model, ids)
    _write_upstream_layout(model, tmp_path / "upstream")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "upstream")
    assert type(loaded.lm_head) is nn.Linear, "lm_head.weight listed as not quantized must stay dense"
    assert torch.equal(logits(loaded, ids), expected)


@pytest.mark.parametrize("matching", ["installed", "weight_names"])
def test_weight_names_in_the_list_load_right_whatever_transformers_matches(tmp_path, monkeypatch, matching):
    """A checkpoint listing only ``lm_head.weight`` as not quantized loads with a dense lm_head and
    the saved model's logits, both with the installed Transformers (which, in 5.x, matches module
    names only) and with one that matches weight names itself, as a fixed Transformers would: that
    one is simulated by replacing the integration's matcher and installing aqlm's fix over it, as
    ``import aqlm`` does."""
    import transformers.integrations.aqlm as integration
    from transformers.quantizers import quantizers_utils

    import aqlm

    if matching == "weight_names":
        module_names_only = quantizers_utils.should_convert_module

        def should_convert_module(full_name, patterns=None):
            if patterns is not None and f"{full_name}.weight" in patterns:
                return False
            return module_names_only(full_name, patterns)

        monkeypatch.setattr(integration, "should_convert_module", should_convert_module)
        aqlm.install_transformers_compat()
    model = tiny_llama(seed=7)
    quantize_linears_nearest(model, AqlmScheme(1, 4, 8, 1))
    ids = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(8))
    expected = logits(model, ids)
    _write_upstream_layout(model, tmp_path / "upstream")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "upstream")
    assert type(loaded.lm_head) is nn.Linear, f"lm_head loaded as {type(loaded.lm_head).__name__}"
    got = logits(loaded, ids)
    assert torch.equal(got, expected), f"logits off by {(got - expected).abs().max():.3g}"


@pytest.mark.parametrize("aqlm_first", [True, False])
def test_fix_works_in_either_import_order(tmp_path, aqlm_first):
    model = tiny_llama(seed=3)
    quantize_linears_nearest(model, AqlmScheme(1, 4, 8, 1))
    _write_upstream_layout(model, tmp_path / "upstream")
    imports = "import aqlm\nimport transformers\n" if aqlm_first else "import transformers\n"
    script = imports + (
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'upstream')!r})\n"
        "print(type(m.lm_head).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "Linear"


def test_tied_embeddings_stay_tied(tmp_path):
    model = tiny_llama(tie=True, seed=4)
    quantize_linears_nearest(model, AqlmScheme(2, 4, 8, 1))
    ids = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    expected = logits(model, ids)
    save_quantized(model, tmp_path / "tied")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(loaded, ids), expected)


def test_save_refuses_models_without_or_with_mixed_schemes(tmp_path):
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        save_quantized(tiny_llama(), tmp_path / "none")
    model = tiny_llama()
    block = get_blocks(model)[0]
    for name, scheme in (("self_attn.q_proj", AqlmScheme(1, 4, 8, 1)), ("self_attn.k_proj", AqlmScheme(2, 4, 8, 1))):
        linear = block.get_submodule(name)
        codes, codebooks, scales = init_quantized_weight(linear.weight.detach(), LayerConfig(scheme=scheme, init_max_iter=2))
        block.set_submodule(name, QuantizedLinear.from_parts(codes, codebooks, scales))
    with pytest.raises(ValueError, match="one scheme for all layers"):
        save_quantized(model, tmp_path / "mixed")


def test_real_model_round_trip(tmp_path):
    """stories260K (the real model bundled in data/): quantize its linears, save, reload, generate."""
    from aqlm.models import stories260k_dir

    model = AutoModelForCausalLM.from_pretrained(stories260k_dir(), dtype=torch.float32).eval()
    quantize_linears_nearest(model, AqlmScheme(2, 8, 4, 1))
    prompt = torch.ones(1, 1, dtype=torch.long)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(6))
    expected = logits(model, ids)
    expected_tokens = model.generate(prompt, max_new_tokens=20, do_sample=False)
    save_quantized(model, tmp_path / "stories")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "stories")
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 35
    assert torch.equal(logits(loaded, ids), expected)
    assert torch.equal(loaded.generate(prompt, max_new_tokens=20, do_sample=False), expected_tokens)


def test_codes_written_packed_like_upstream(tmp_path):
    """Saved 8-bit codes are int8 holding code - 256 for codes >= 128, so upstream's reading
    (the int8 bits as an unsigned byte) gives each block's code. With one codebook from k-means
    that code is the codeword nearest to the block divided by its scale, computed here in NumPy
    from the dense weight and the saved codebooks and scales."""
    from safetensors.torch import load_file

    model = tiny_llama()
    dense = model.model.layers[0].self_attn.q_proj.weight.detach().double().numpy()
    quantize_linears_nearest(model, AqlmScheme(1, 8, 8, 1))
    save_quantized(model, tmp_path / "q")
    tensors = load_file(str(tmp_path / "q" / "model.safetensors"))
    codes = tensors["model.layers.0.self_attn.q_proj.codes"]
    assert codes.dtype == torch.int8 and codes.shape == (64, 8, 1)
    scales = tensors["model.layers.0.self_attn.q_proj.scales"]
    codebooks = tensors["model.layers.0.self_attn.q_proj.codebooks"]
    assert scales.shape == (64, 1, 1, 1)
    assert codebooks.shape == (1, 256, 1, 8)

    blocks = dense.reshape(64, 8, 8) / scales.double().numpy().reshape(64, 1, 1)
    words = codebooks.double().numpy().reshape(256, 8)
    distances = ((blocks[:, :, None, :] - words[None, None, :, :]) ** 2).sum(axis=-1)  # [64, 8, 256]
    nearest = distances.argmin(axis=-1)
    read_back = codes.numpy()[:, :, 0].view(np.uint8).astype(np.int64)
    assert (read_back >= 128).any() and (read_back < 128).any(), "both halves of the code range occur"
    differs = read_back != nearest
    chosen = np.take_along_axis(distances, read_back[..., None], axis=-1)[..., 0]
    best = distances.min(axis=-1)
    assert np.all(chosen[differs] <= best[differs] * (1 + 1e-5) + 1e-12), "stored codes are nearest codewords"
    assert differs.mean() < 0.01, "only float32 near-ties may pick another codeword"
