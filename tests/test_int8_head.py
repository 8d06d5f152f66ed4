"""aqlm.Int8Linear / aqlm.quantize_lm_head: an LM head whose few-token CPU calls read int8 rows.

Few float32 tokens without gradients must give exactly ``ops.int8_linear`` on the rows of
``ops.int8_quantize_rows`` (the same numbers as LlamaDecoder's int8 head); everything else must be
``nn.Linear`` on the untouched float weight, which stays shared with tied embeddings.
"""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aqlm import Int8Linear, ops, quantize_lm_head
from aqlm.int8_head import INT8_MAX_TOKENS


def tiny_llama(tie: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def int8_formula(linear: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    q, scales = ops.int8_quantize_rows(linear.weight.detach().float())
    return ops.int8_linear(x, q, scales, None if linear.bias is None else linear.bias.detach())


@pytest.mark.parametrize("bias", [False, True])
def test_few_tokens_read_the_int8_rows_and_many_tokens_the_float_weight(bias):
    linear = torch.nn.Linear(64, 300, bias=bias)
    head = Int8Linear(linear)
    assert head.weight is linear.weight and isinstance(head, torch.nn.Linear)
    with torch.no_grad():
        for tokens in (1, INT8_MAX_TOKENS):
            x = torch.randn(1, tokens, 64)
            got = head(x)
            assert torch.equal(got, int8_formula(linear, x))
            assert not torch.equal(got, linear(x))  # the int8 rows really are used
            torch.testing.assert_close(got, linear(x), rtol=0, atol=0.02 * float(linear(x).abs().max()))
        x = torch.randn(INT8_MAX_TOKENS + 1, 64)
        assert torch.equal(head(x), linear(x))
        head.double()  # other dtypes: the (converted) float weight, as nn.Linear
        assert torch.equal(head(x[:2].double()), torch.nn.functional.linear(x[:2].double(), linear.weight, linear.bias))


def test_gradients_use_the_float_weight_and_changes_remake_the_rows():
    linear = torch.nn.Linear(64, 96)
    head = Int8Linear(linear)
    x = torch.randn(2, 64, requires_grad=True)
    out = head(x)
    assert torch.equal(out, linear(x))
    out.sum().backward()
    assert x.grad is not None and linear.weight.grad is not None
    with torch.no_grad():
        before = head(x)
        linear.weight.mul_(2)
        assert torch.equal(head(x), int8_formula(linear, x))
        assert not torch.equal(head(x), before)


@pytest.mark.parametrize("tie", [True, False])
def test_quantize_lm_head_keeps_the_model_and_generate_uses_the_rows(tie, tmp_path):
    model = tiny_llama(tie)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 15, 17, 19]])  # more than INT8_MAX_TOKENS positions
    assert ids.shape[1] > INT8_MAX_TOKENS
    with torch.no_grad():
        logits = model(ids).logits
        hidden = model.model(ids).last_hidden_state
    head = model.lm_head
    assert quantize_lm_head(model) is model and isinstance(model.lm_head, Int8Linear)
    assert quantize_lm_head(model).lm_head is model.lm_head  # twice: a no-op
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)  # all positions: the float weight
        assert torch.equal(model(ids, logits_to_keep=1).logits, int8_formula(head, hidden[:, -1:]))
        assert torch.equal(model(ids[:, :4]).logits, int8_formula(head, model.model(ids[:, :4]).last_hidden_state))
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=5)
    assert out.shape == (1, 14)
    model.save_pretrained(tmp_path / "saved")
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(reloaded.lm_head) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, logits)


def test_refusals_name_the_problem():
    with pytest.raises(TypeError, match="Int8Linear wraps an nn.Linear, got Conv1d"):
        Int8Linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="get_output_embeddings\\(\\) is an nn.Linear, got nothing"):
        quantize_lm_head(torch.nn.Linear(2, 2))
