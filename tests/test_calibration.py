from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from aqlm.calibration import capture_block_inputs, find_linears, get_blocks, run_block
from random_models import tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


def logits_through_blocks(model, windows, batch_size):
    inputs, kwargs = capture_block_inputs(model, windows, batch_size=batch_size, progress=False)
    hidden = inputs
    for block in get_blocks(model):
        hidden = run_block(block, hidden, kwargs, batch_size=batch_size)
    with torch.no_grad():
        return model.lm_head(model.model.norm(hidden))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_blockwise_forward_reproduces_logits(attn, batch_size):
    model = tiny_llama(seed=1, layers=3, attn=attn)
    windows = torch.randint(0, 128, (5, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(windows).logits
    torch.testing.assert_close(logits_through_blocks(model, windows, batch_size), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "model_class, config_class",
    [(MistralForCausalLM, MistralConfig), (Qwen2ForCausalLM, Qwen2Config)],
)
def test_blockwise_forward_other_families(model_class, config_class):
    torch.manual_seed(0)
    config = config_class(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = model_class(config).eval()
    windows = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(windows).logits
    torch.testing.assert_close(logits_through_blocks(model, windows, 2), expected, rtol=0, atol=1e-5)


def test_captured_kwargs_are_batch_independent(llama):
    windows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
    inputs, kwargs = capture_block_inputs(llama, windows, batch_size=4, progress=False)
    assert inputs.shape == (4, 16, 64) and inputs.dtype == torch.float32
    assert kwargs["use_cache"] is False
    cache_keys = {"cache", "past_key_values"} & set(kwargs)
    assert len(cache_keys) == 1 and kwargs[cache_keys.pop()] is None  # one name, the installed Transformers'
    assert kwargs["position_ids"].shape == (1, 16)
    cos, sin = kwargs["position_embeddings"]
    assert cos.shape[0] == 1 and sin.shape[0] == 1
    torch.testing.assert_close(inputs, llama.model.embed_tokens(windows).detach())


def test_run_block_in_place_and_tuple_outputs(llama):
    windows = torch.randint(0, 128, (3, 8), generator=torch.Generator().manual_seed(3))
    inputs, kwargs = capture_block_inputs(llama, windows, progress=False)
    block = get_blocks(llama)[0]
    expected = run_block(block, inputs, kwargs, batch_size=2)

    class TupleBlock(nn.Module):
        def forward(self, hidden, **kwargs):
            return (block(hidden, **kwargs), None)

    torch.testing.assert_close(run_block(TupleBlock(), inputs, kwargs), expected)
    same = inputs.clone()
    assert run_block(block, same, kwargs, batch_size=2, out=same) is same
    torch.testing.assert_close(same, expected)


def test_find_linears_names(llama):
    names = set(find_linears(get_blocks(llama)[0]))
    assert names == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }
    assert "lm_head" in find_linears(llama)


def test_get_blocks_rejects_other_layouts():
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = type("Config", (), {"model_type": "bert"})()
            self.encoder = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ValueError, match=r"'bert'.*llama, mistral, qwen2"):
        get_blocks(Encoder())


def test_capture_rejects_bad_windows(llama):
    with pytest.raises(ValueError, match="windows"):
        capture_block_inputs(llama, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        capture_block_inputs(llama, torch.zeros(2, 4, dtype=torch.long), batch_size=0)
