from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn as nn

from aqlm import evaluate
from aqlm.evaluate import kl_divergence, kv_cache_keyword, perplexity, perplexity_on_file, sample_sequences
from random_models import tiny_llama


@pytest.fixture
def llama():
    return tiny_llama()


def reference_perplexity(model, tokens, seqlen):
    """GPTQ's llama_eval, written out plainly: full logits per window, mean NLL, exp of the mean."""
    nlls = []
    with torch.no_grad():
        for i in range(tokens.numel() // seqlen):
            window = tokens[i * seqlen : (i + 1) * seqlen][None]
            logits = model(window).logits[0, :-1]
            nlls.append(nn.functional.cross_entropy(logits, window[0, 1:]) * seqlen)
    return math.exp(torch.stack(nlls).sum().item() / (len(nlls) * seqlen))


@pytest.mark.parametrize("batch_size", [1, 2, 4])
def test_perplexity_matches_plain_loop(llama, batch_size):
    tokens = torch.randint(0, 128, (7 * 20 + 5,), generator=torch.Generator().manual_seed(0))
    expected = reference_perplexity(llama, tokens, 20)
    got = perplexity(llama, tokens, 20, batch_size=batch_size, progress=False)
    assert got == pytest.approx(expected, rel=1e-4)


def test_perplexity_in_small_logit_chunks(llama, monkeypatch):
    tokens = torch.randint(0, 128, (100,), generator=torch.Generator().manual_seed(1))
    expected = reference_perplexity(llama, tokens, 25)
    monkeypatch.setattr(evaluate, "LOGITS_CHUNK_ELEMENTS", 3 * 128)  # three positions per chunk
    assert perplexity(llama, tokens, 25, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-4)


def test_perplexity_without_split_head(llama):
    """A model with logit softcapping is scored on its full logits, and still matches."""
    tokens = torch.randint(0, 128, (60,), generator=torch.Generator().manual_seed(2))
    llama.config.final_logit_softcapping = 30.0  # ignored by Llama's forward, but disables the split path
    assert evaluate._split_head(llama) is None
    expected = reference_perplexity(llama, tokens, 30)
    assert perplexity(llama, tokens, 30, progress=False) == pytest.approx(expected, rel=1e-4)


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(llama):
    nn.init.zeros_(llama.lm_head.weight)
    tokens = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(3))
    assert perplexity(llama, tokens, 16, progress=False) == pytest.approx(128, rel=1e-5)


def test_perplexity_on_file(llama, tmp_path):
    tokens = torch.randint(0, 128, (90,), generator=torch.Generator().manual_seed(4))
    torch.save(tokens, tmp_path / "tokens.pt")
    got = perplexity_on_file(llama, None, tmp_path / "tokens.pt", 30, progress=False)
    assert got == pytest.approx(reference_perplexity(llama, tokens, 30), rel=1e-4)


def test_perplexity_errors(llama):
    with pytest.raises(ValueError, match=r"seqlen = 32 tokens.*got 31"):
        perplexity(llama, torch.zeros(31, dtype=torch.long), 32, progress=False)
    with pytest.raises(ValueError, match="seqlen must be an integer >= 2"):
        perplexity(llama, torch.zeros(31, dtype=torch.long), 1, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        perplexity(llama, torch.zeros(31, dtype=torch.long), 4, batch_size=0, progress=False)


def test_sample_sequences_is_seeded(llama):
    first = sample_sequences(llama, 3, 12, seed=5, progress=False)
    assert first.shape == (3, 12) and first.dtype == torch.long
    assert bool((first[:, 0] == 1).all())
    assert torch.equal(first, sample_sequences(llama, 3, 12, seed=5, progress=False))
    assert not torch.equal(first, sample_sequences(llama, 3, 12, seed=6, progress=False))


def test_sample_sequences_greedy_follows_argmax(llama):
    ids = sample_sequences(llama, 2, 8, seed=0, bos_token_id=3, temperature=0.0, progress=False)
    with torch.no_grad():
        logits = llama(ids).logits
    assert torch.equal(ids[:, 1:], logits[:, :-1].argmax(dim=-1))


def test_sample_sequences_passes_the_cache_by_the_current_name(llama):
    """Transformers 5.x renamed the forward's past_key_values to cache; the old name warns (and
    goes in 5.40). Models with the old signature still get the old name."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sample_sequences(llama, 2, 6, seed=0, progress=False)

    class OldSignature(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return None

    assert kv_cache_keyword(OldSignature()) == "past_key_values"


def test_sample_sequences_errors(llama):
    with pytest.raises(ValueError, match="length"):
        sample_sequences(llama, 2, 0, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        sample_sequences(llama, 2, 4, seed=0, temperature=-1.0)


def test_kl_divergence_to_itself_is_zero_and_positive_when_perturbed(llama):
    sequences = sample_sequences(llama, 4, 16, seed=0, progress=False)
    assert abs(kl_divergence(llama, llama, sequences, batch_size=3, progress=False)) < 1e-6
    perturbed = copy.deepcopy(llama)
    torch.manual_seed(1)
    with torch.no_grad():
        for parameter in perturbed.model.layers.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    small = kl_divergence(perturbed, llama, sequences, batch_size=2, progress=False)
    assert small > 0


def test_kl_divergence_matches_direct_formula(llama):
    other = tiny_llama(seed=7)
    sequences = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        log_p = torch.log_softmax(llama(sequences).logits, -1)
        log_q = torch.log_softmax(other(sequences).logits, -1)
    expected = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    assert kl_divergence(other, llama, sequences, batch_size=2, progress=False) == pytest.approx(expected, rel=1e-5)


def test_kl_divergence_errors(llama):
    with pytest.raises(ValueError, match="sequences"):
        kl_divergence(llama, llama, torch.zeros(5, dtype=torch.long))
    smaller = tiny_llama(vocab=64)
    with pytest.raises(ValueError, match="vocabulary sizes differ"):
        kl_divergence(smaller, llama, torch.zeros(1, 4, dtype=torch.long), progress=False)


def test_perplexity_and_kl_with_quantized_linears(llama, monkeypatch):
    """Linears replaced by aqlm.QuantizedLinear score like dense linears holding the same weights."""
    from aqlm import QuantizedLinear, pack_codes
    from aqlm.calibration import find_linears

    generator = torch.Generator().manual_seed(9)
    dense = copy.deepcopy(llama)
    for name, linear in find_linears(llama.model).items():
        out_features, in_features = linear.weight.shape
        codes = torch.randint(0, 256, (out_features, in_features // 8, 1), generator=generator)
        codebooks = 0.05 * torch.randn(1, 256, 1, 8, generator=generator)
        layer = QuantizedLinear.from_parts(pack_codes(codes, 8), codebooks, torch.ones(out_features))
        llama.model.set_submodule(name, layer)
        dense.model.get_submodule(name).weight.data.copy_(layer.reference_weight())
    tokens = torch.randint(0, 128, (64,), generator=generator)
    assert perplexity(llama, tokens, 16, progress=False) == pytest.approx(
        perplexity(dense, tokens, 16, progress=False), rel=1e-4
    )
    assert abs(kl_divergence(llama, dense, tokens.reshape(4, 16), progress=False)) < 1e-6
