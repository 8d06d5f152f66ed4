"""One resume fingerprint of a model directory for quantization and PV-Tuning: it changes with the
weights' contents, not only with config.json or file sizes."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aqlm import AqlmScheme
from aqlm.fileio import model_identity
from aqlm.quantize import FinetuneConfig, LayerConfig, QuantizeConfig, quantize_model


def save_tiny(path, seed=0, bump=0.0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[0, 0] += bump
    model.save_pretrained(path)


def test_identity_changes_with_weight_contents_of_the_same_size(tmp_path):
    save_tiny(tmp_path / "a")
    save_tiny(tmp_path / "b", bump=1.0)
    first, second = model_identity(tmp_path / "a"), model_identity(tmp_path / "b")
    assert first["config_sha256"] == second["config_sha256"]
    assert set(first["weights_sha256"]) == {"model.safetensors"}
    assert first != second
    assert model_identity(tmp_path / "a") == first


def test_quantize_refuses_to_resume_onto_changed_weights(tmp_path):
    save_tiny(tmp_path / "dense")
    torch.save(torch.randint(0, 96, (2000,), generator=torch.Generator().manual_seed(0)), tmp_path / "tokens.pt")
    config = QuantizeConfig(
        layer=LayerConfig(scheme=AqlmScheme.parse("1x4g8"), max_epochs=1, steps_per_epoch=2, init_max_iter=2,
                          codebook_update="lstsq"),
        finetune=FinetuneConfig(max_epochs=0),
        nsamples=2,
        seqlen=16,
    )
    quantize_model(tmp_path / "dense", tmp_path / "tokens.pt", tmp_path / "q", config, progress=False, log=lambda line: None)
    (tmp_path / "q" / "quantization_report.json").unlink()  # as if killed before the end: a run to resume
    save_tiny(tmp_path / "dense", bump=1.0)
    with pytest.raises(ValueError, match=r"cannot resume: .*\(model\)"):
        quantize_model(tmp_path / "dense", tmp_path / "tokens.pt", tmp_path / "q", config, resume=True, progress=False,
                       log=lambda line: None)
