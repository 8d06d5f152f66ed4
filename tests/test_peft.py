"""PEFT LoRA training on AQLM layers: peft wraps QuantizedLinear in its AqlmLoraLinear."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from aqlm import AqlmScheme, QuantizedLinear, save_quantized
from aqlm.calibration import find_linears, get_blocks
from aqlm.quantize.layer import LayerConfig, init_quantized_weight
from random_models import tiny_llama

peft = pytest.importorskip("peft", reason="peft is in the test extras: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def aqlm_checkpoint(tmp_path_factory):
    """A small Llama whose block linears are AQLM 2x8g8 (k-means codebooks), saved as a checkpoint."""
    model = tiny_llama(seed=0)
    config = LayerConfig(scheme=AqlmScheme(2, 8, 8, 1), init_max_iter=5)
    for block in get_blocks(model):
        for name, linear in find_linears(block).items():
            codes, codebooks, scales = init_quantized_weight(linear.weight.detach(), config)
            block.set_submodule(name, QuantizedLinear.from_parts(codes, codebooks, scales))
    path = tmp_path_factory.mktemp("aqlm") / "checkpoint"
    save_quantized(model, path)
    return path


def test_lora_trains_saves_and_reloads(aqlm_checkpoint, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(aqlm_checkpoint)
    lora = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, lora)
    wrapped = [m for m in model.modules() if type(m).__name__ == "AqlmLoraLinear"]
    assert len(wrapped) == 4, "peft should wrap q_proj and v_proj of both blocks in its AQLM LoRA layer"
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)

    tokens = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for _ in range(20):
        optimizer.zero_grad()
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
    assert losses[-1] < losses[0] - 0.1, f"LoRA training did not lower the loss: {losses}"
    with_gradients = {name for name, p in model.named_parameters() if p.grad is not None}
    assert with_gradients == trainable, "only LoRA parameters may receive gradients"

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    model.save_pretrained(tmp_path / "adapter")
    fresh = AutoModelForCausalLM.from_pretrained(aqlm_checkpoint)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    with torch.no_grad():
        got = reloaded(input_ids=tokens).logits
    assert torch.equal(got, expected)
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(aqlm_checkpoint)(input_ids=tokens).logits
    assert not torch.allclose(base, expected), "the adapter must change the logits"
