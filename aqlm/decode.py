"""A lean greedy decoding loop for Llama-family models on the CPU: ``LlamaDecoder``.

Transformers' ``generate`` spends most of a SmolLM2 token outside the matrix products: cache
objects, masks, hooks and some forty small torch calls per decoder layer. This loop runs the same
model (its own parameters, no copies of the linear weights) with everything a token needs made
once: a key/value cache of ``max_length`` positions, one set of activation buffers, the rotary
tables, and every :class:`aqlm.QuantizedLinear` bound to its C kernel with those buffers
(:func:`aqlm.ops.bound_linear_cpu`). A decoding step is then 11 calls per layer (7 matrix
products, 2 residual-and-norm steps, one attention step, one SiLU gate), all run by one C call
(:func:`aqlm.ops.step_program`) when every linear is a CPU ``QuantizedLinear`` (else one by one
from Python), and one matrix-vector product for the LM head. Each quantized linear also names
the one that runs after it, for its kernel to prefetch what that one reads first
(:func:`aqlm.ops.chain_bound_linears`).

A prompt goes through the layers' own forward in one pass, or, up to ``PROMPT_STEP_TOKENS``
tokens, through the decoding step token by token (faster for so few); each new token through the
bound kernels. Logits match the model's own forward to float32 rounding (tested).

Supported: ``model_type`` "llama", "mistral" (without a sliding window shorter than
``max_length``) and "qwen2", with SiLU-gated MLPs, any rotary variant the model's own rotary
embedding computes, grouped-query attention, and attention biases. The linears may be
``QuantizedLinear`` or any module that maps float32 to float32 activations (dense ``nn.Linear``
included, so the same loop times a dense model).

Shared cores: several threads pay only while each keeps its core. With another process busy on
one of 2 cores, every one of a token's parallel regions waits for the thread that lost its core,
and SmolLM2 2x8g8 fell from 100 tok/s (2 threads, quiet) to 18-24 tok/s, below the 56 tok/s of one
thread. So a decoder built for several threads also binds a one-thread copy of its step, and
``generate`` now and then times a few tokens on the other thread count and keeps the faster
(:class:`_ThreadChoice`). aqlm's kernels give the same bits on any thread count; torch's dense
products (a dense model's linears, an "exact" or "bf16" LM head) may round differently, which
can change a greedy token only at a near tie.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import ops
from .inference import QuantizedLinear

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
LM_HEAD_MODES = ("exact", "bf16", "int8")
# generate runs prompts of up to this many tokens through the decoding step, token by token; longer
# ones in one pass. SmolLM2 2x8g8, 2 threads (ms, one pass / stepped): 2 tokens 19.4 / 8.0, 8 tokens
# 37-48 / 33-37, 10 tokens 40.7 / 41.1, 12 tokens 54.4 / 58.2, 16 tokens 50 / 74.
PROMPT_STEP_TOKENS = 8
# The step's quantized linears take the SIMD quantized-table kernel wherever it serves (not under
# AQLM_QUANTIZED_LUT=0 or another AQLM_CPU_KERNEL), whatever a single weight measured alone
# preferred: only it prefetches the next linear's codes (ops.chain_bound_linears), and a step reads
# every layer's codes from beyond the caches. SmolLM2 2x8g8, 64 tokens, 2 threads, the same
# tokens: on the AVX2 path (AQLM_SIMD=avx2), whose measured choice was "lut", median 58.8 -> 64.4
# tok/s (best 62.2 -> 72.7); not on the scalar path, where "lutq" gave 8.3 tok/s against 21.0.
STEP_KERNEL = "lutq"


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """torch's (and so the bound kernels') thread count set to ``count`` inside, restored after."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


class _ThreadChoice:
    """Which thread count the next decoded token runs on: ``threads`` or 1, whichever decoded
    faster when last compared.

    Tokens go in rounds. A round opens with ``probe`` tokens on the current count and ``probe``
    on the other; the other becomes current if its median token time is below ``margin`` times
    the current one's, and its probe stops early at a token slower than ``give_up`` times the
    current median. The round then runs on the current count; rounds double in length (up to
    ``longest`` tokens) while the choice holds and restart at ``shortest`` when it changes, so a
    quiet machine pays about one slower token in hundreds, and a newly busy one is noticed within
    ``longest`` tokens. The decoder keeps one choice across its ``generate`` calls.
    """

    def __init__(self, threads: int, probe: int = 3, shortest: int = 16, longest: int = 512, margin: float = 0.9,
                 give_up: float = 1.5):
        self.counts = (threads, 1)
        self.current, self.probe, self.shortest, self.longest, self.margin = threads, probe, shortest, longest, margin
        self.give_up = give_up
        self.length, self.position = shortest, 0
        self.times: dict[int, list[float]] = {threads: [], 1: []}

    def next(self) -> int:
        """The thread count for the next token."""
        if self.position < self.probe:
            return self.current
        if self.position < 2 * self.probe:
            return self.other
        return self.current

    @property
    def other(self) -> int:
        """The thread count that is not current."""
        return self.counts[1] if self.current == self.counts[0] else self.counts[0]

    def record(self, count: int, seconds: float) -> None:
        """The time of the token just run on ``count`` threads."""
        if self.position < 2 * self.probe:
            self.times[count].append(seconds)
            if count != self.current and seconds > self.give_up * statistics.median(self.times[self.current]):
                self.position = 2 * self.probe - 1  # clearly slower: the probe ends with this token
        self.position += 1
        if self.position == 2 * self.probe:
            current, other = (statistics.median(self.times[c]) for c in (self.current, self.other))
            if other < self.margin * current:
                self.current, self.length = self.other, self.shortest
            else:
                self.length = min(2 * self.length, self.longest)
            self.times = {c: [] for c in self.counts}
        if self.position >= self.length:
            self.position = 0


def _bind(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> Callable[[], None]:
    """A call writing ``module(x)`` into ``out``: the bound C kernel for a CPU QuantizedLinear
    (quantized tables wherever they serve, STEP_KERNEL), ``torch.mm``/``addmm`` into ``out`` for
    a float32 ``nn.Linear``, else the module's own forward."""
    if isinstance(module, QuantizedLinear) and module.codes.is_cpu:
        prefer = STEP_KERNEL if ops.lutq_kernel_name() != "scalar" else None
        return ops.bound_linear_cpu(x, out, module.codes, module.codebooks, module.scales, module.bias, prefer=prefer)
    if type(module) is nn.Linear and module.weight.dtype == torch.float32:
        weight = module.weight.detach().t()
        if module.bias is None:
            return lambda: torch.mm(x, weight, out=out)
        bias = module.bias.detach()
        return lambda: torch.addmm(bias, x, weight, out=out)
    return lambda: out.copy_(_apply(module, x))


def _apply(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for float32 activations x, whatever the module's parameter dtype: a dense
    layer of another float dtype gets x in its dtype, and the result comes back in float32."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and isinstance(weight, torch.Tensor) and weight.dtype != x.dtype:
        return module(x.to(weight.dtype)).float()
    return module(x)


def _norm_weight(module: nn.Module, name: str) -> tuple[torch.Tensor, float]:
    """The float32 weight and epsilon of a Llama-family RMSNorm (its class name ends in RMSNorm)."""
    weight, eps = getattr(module, "weight", None), getattr(module, "variance_epsilon", None)
    if not type(module).__name__.endswith("RMSNorm") or not isinstance(weight, torch.Tensor) or not isinstance(eps, float):
        raise ValueError(f"LlamaDecoder needs RMSNorm layers with a weight and variance_epsilon, got {name}: {type(module).__name__}")
    return weight.detach().float().contiguous(), eps


class LlamaDecoder:
    """Greedy decoding of a Llama-family causal LM with preallocated buffers and bound kernels.

    Args:
        model: a Hugging Face ``LlamaForCausalLM`` (or Mistral, Qwen2) on the CPU, as loaded by
            ``AutoModelForCausalLM.from_pretrained`` (AQLM or dense).
        max_length: positions in the key/value cache (prompt plus new tokens).
        lm_head: "exact" uses the model's LM head as it is; "bf16" keeps a bfloat16 copy of its
            weight (half the bytes read per token; logits change by bfloat16 rounding); "int8"
            keeps it as int8 rows with one float32 scale each (:func:`aqlm.ops.int8_linear`: a
            quarter of float32's bytes; each weight moves by at most half its row's step, and
            the hidden state is rounded to int16 for integer dot products).

    The kernels are chosen when the decoder is built, for the thread count and ``AQLM_*``
    environment of that moment; with several threads, ``generate`` switches between that count
    and one thread, whichever decodes faster (module docstring). The key/value cache takes 2 x layers x max_length x kv_heads x
    head_dim float32 values (SmolLM2-135M at 2048 positions: 94 MB). The decoder holds references to the model's parameters: do not
    change them while it is in use.

    Raises:
        ValueError: the model is not a supported architecture, not on the CPU, or an argument is
            out of range.
    """

    def __init__(self, model: nn.Module, max_length: int = 2048, lm_head: str = "exact"):
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
        if lm_head not in LM_HEAD_MODES:
            raise ValueError(f"lm_head must be one of {LM_HEAD_MODES}, got {lm_head!r}")
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"LlamaDecoder supports model_type {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        if getattr(config, "hidden_act", None) != "silu":
            raise ValueError(f"LlamaDecoder needs hidden_act='silu', got {getattr(config, 'hidden_act', None)!r}")
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if window is not None and window < max_length:
            raise ValueError(f"the model attends over a sliding window of {window} positions, shorter than "
                             f"max_length={max_length}: LlamaDecoder attends over every position")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) == "dynamic":
            raise ValueError("LlamaDecoder precomputes the rotary tables once, which dynamic rope scaling does not "
                             "allow (it rescales with the sequence length): use Transformers' generate")
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_cpu:
                raise ValueError(f"LlamaDecoder runs on the CPU, but {name} is on {tensor.device}")
        self.max_length = max_length
        inner = model.model
        self.hidden = config.hidden_size
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.heads
        self.layers = list(inner.layers)
        self.embedding = inner.embed_tokens.weight
        self.final_norm = inner.norm
        self.vocab = self.embedding.shape[0]

        positions = torch.arange(max_length)[None]
        with torch.no_grad():
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        if self.cos.shape != (max_length, self.head_dim):
            raise ValueError(f"the model's rotary embedding gave tables of shape {tuple(self.cos.shape)}, "
                             f"expected [{max_length}, {self.head_dim}]")

        head = model.lm_head
        if lm_head != "exact" and (not isinstance(head, nn.Linear) or head.bias is not None):
            raise ValueError(f"lm_head={lm_head!r} needs an nn.Linear LM head without bias, got {type(head).__name__}")
        self.lm_head, self.head_mode = head, lm_head
        self.head_weight = head.weight.detach().to(torch.bfloat16) if lm_head == "bf16" else None
        self.head_int8 = ops.int8_quantize_rows(head.weight.detach().float()) if lm_head == "int8" else None
        # generate's int8-head logits go here (one token's, float32): a fresh tensor of a
        # vocabulary's logits each token costs an allocation and its page faults
        self.next_logits = torch.empty(1, self.vocab) if lm_head == "int8" else None

        D, H, KV = self.head_dim, self.heads, self.kv_heads
        self.keys = [torch.zeros(max_length, KV, D) for _ in self.layers]
        self.values = [torch.zeros(max_length, KV, D) for _ in self.layers]
        self.length = 0

        # One set of step buffers, shared by every layer (they run one after the other). Each
        # layer's input norm also adds the previous layer's MLP output to the residual stream h.
        intermediate = config.intermediate_size
        self.h, self.x, self.final_x = torch.zeros(1, self.hidden), torch.zeros(1, self.hidden), torch.zeros(1, self.hidden)
        self.q, self.k, self.v = torch.zeros(1, H * D), torch.zeros(1, KV * D), torch.zeros(1, KV * D)
        self.attended = torch.zeros(1, H * D)
        self.attn_out = torch.zeros(1, self.hidden)
        self.gate, self.up = torch.zeros(1, intermediate), torch.zeros(1, intermediate)
        self.mlp_out = torch.zeros(1, self.hidden)
        # Bound steps for torch's thread count and, when that is several, for one thread (shared
        # cores: see the module docstring); each binding picks its kernels for its own count.
        self.threads = torch.get_num_threads()
        self.programs = {}
        for count in sorted({self.threads, 1}, reverse=True):
            with _torch_threads(count):
                self.programs[count] = self._bind_steps()
        self.thread_choice = _ThreadChoice(self.threads) if self.threads > 1 else None

    def _bind_steps(self) -> tuple[list, Callable[[], None], Optional[Callable[[int], None]]]:
        """Every layer's bound calls, the final norm's, and all of them as one C call where every
        linear has a C kernel (ops.step_program; else None), for torch's current thread count."""
        steps = []
        for index, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            input_weight, input_eps = _norm_weight(layer.input_layernorm, f"layers.{index}.input_layernorm")
            post_weight, post_eps = _norm_weight(layer.post_attention_layernorm, f"layers.{index}.post_attention_layernorm")
            steps.append(
                (
                    ops.bound_residual_rms_norm(self.h, None if index == 0 else self.mlp_out, input_weight, self.x, input_eps),
                    _bind(attention.q_proj, self.x, self.q),
                    _bind(attention.k_proj, self.x, self.k),
                    _bind(attention.v_proj, self.x, self.v),
                    ops.bound_attend_one(self.q, self.k, self.v, self.cos, self.sin, self.keys[index], self.values[index],
                                         self.attended, attention.scaling),
                    _bind(attention.o_proj, self.attended, self.attn_out),
                    ops.bound_residual_rms_norm(self.h, self.attn_out, post_weight, self.x, post_eps),
                    _bind(mlp.gate_proj, self.x, self.gate),
                    _bind(mlp.up_proj, self.x, self.up),
                    ops.bound_silu_mul(self.gate, self.up),
                    _bind(mlp.down_proj, self.gate, self.mlp_out),
                )
            )
        final_weight, final_eps = _norm_weight(self.final_norm, "norm")
        final_step = ops.bound_residual_rms_norm(self.h, self.mlp_out, final_weight, self.final_x, final_eps)
        in_order = [call for layer in steps for call in layer] + [final_step]
        ops.chain_bound_linears(in_order)  # each quantized linear prefetches what the next one reads first
        return steps, final_step, ops.step_program(in_order)

    def reset(self) -> None:
        """Forget every position (the cache is reused, not reallocated)."""
        self.length = 0

    def _rotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Rotary embedding of x [tokens, heads, head_dim] at positions start, start + 1, ..."""
        tokens = x.shape[0]
        cos, sin = self.cos[start : start + tokens, None], self.sin[start : start + tokens, None]
        half = self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    def _attend(self, layer: int, q: torch.Tensor, start: int, tokens: int) -> torch.Tensor:
        """Attention of q [tokens, heads, head_dim] over the cache up to start + tokens (causal)."""
        end = start + tokens
        keys = self.keys[layer][:end].transpose(0, 1)[None]
        values = self.values[layer][:end].transpose(0, 1)[None]
        mask = None
        if tokens > 1:
            mask = torch.arange(end)[None, :] <= torch.arange(start, end)[:, None]
        scale = self.layers[layer].self_attn.scaling
        return F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys, values, attn_mask=mask, scale=scale,
                                              enable_gqa=True)[0].transpose(0, 1)

    def _check_room(self, tokens: int) -> None:
        if self.length + tokens > self.max_length:
            raise ValueError(f"{self.length} cached positions plus {tokens} new tokens exceed max_length={self.max_length}")

    @torch.no_grad()
    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run ``ids`` [tokens] through every layer's own modules; the final hidden states [tokens, hidden]."""
        start, tokens = self.length, ids.shape[0]
        D, H, KV = self.head_dim, self.heads, self.kv_heads
        h = self.embedding[ids].float()
        for index, layer in enumerate(self.layers):
            attention, mlp = layer.self_attn, layer.mlp
            x = layer.input_layernorm(h).float()
            q = self._rotate(_apply(attention.q_proj, x).view(tokens, H, D), start)
            self.keys[index][start : start + tokens] = self._rotate(_apply(attention.k_proj, x).view(tokens, KV, D), start)
            self.values[index][start : start + tokens] = _apply(attention.v_proj, x).view(tokens, KV, D)
            attended = self._attend(index, q, start, tokens).reshape(tokens, H * D)
            h = h + _apply(attention.o_proj, attended)
            x = layer.post_attention_layernorm(h).float()
            h = h + _apply(mlp.down_proj, F.silu(_apply(mlp.gate_proj, x)) * _apply(mlp.up_proj, x))
        self.length += tokens
        return self.final_norm(h).float()

    @torch.no_grad()
    def _step(self, token: int, threads: Optional[int] = None) -> torch.Tensor:
        """One new token through the bound kernels (those bound for ``threads``: the decoder's
        own count by default); its final normed hidden state [1, hidden]."""
        steps, final_step, program = self.programs[threads or self.threads]
        position = self.length
        self.h.copy_(self.embedding[token])
        if program is not None:  # one C call for the whole step
            program(position)
            self.length += 1
            return self.final_x
        for input_norm, q_proj, k_proj, v_proj, attend, o_proj, post_norm, gate_proj, up_proj, silu_mul, down_proj in steps:
            input_norm()
            q_proj(), k_proj(), v_proj()
            attend(position)
            o_proj()
            post_norm()
            gate_proj(), up_proj()
            silu_mul()
            down_proj()
        final_step()
        self.length += 1
        return self.final_x

    def _logits(self, hidden: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """float32 logits [tokens, vocab] of final hidden states [tokens, hidden]; the int8 head
        writes them into ``out`` when given (the other heads ignore it)."""
        if self.head_mode == "bf16":
            return F.linear(hidden.to(torch.bfloat16), self.head_weight).float()
        if self.head_mode == "int8":
            return ops.int8_linear(hidden, *self.head_int8, out=out)
        return _apply(self.lm_head, hidden).float()

    def _next_token(self, hidden: torch.Tensor) -> int:
        """The greedy token after the final hidden state ``hidden`` [1, hidden]: the argmax of its
        logits (the first of equal maxima, as torch.argmax), computed into ``next_logits`` where
        the head allows, and found by NumPy (torch.argmax took 42 us for SmolLM2's 49152 logits
        warm, 80-100 us in the decoding loop; NumPy 4 us)."""
        return int(self._logits(hidden, out=self.next_logits).detach().numpy().argmax())

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, one_by_one: bool = False) -> torch.Tensor:
        """Logits [tokens, vocab] of every position of ``input_ids`` ([tokens] or [1, tokens]),
        from an empty cache: in one prompt pass, or token by token through the decoding step."""
        ids = self._check_ids(input_ids)
        self.reset()
        self._check_room(ids.shape[0])
        if one_by_one:
            return torch.cat([self._logits(self._step(int(token))) for token in ids])
        return self._logits(self._prefill(ids))

    @torch.no_grad()
    def generate(
        self, input_ids: torch.Tensor, max_new_tokens: int, eos_token_id: Optional[int | Sequence[int]] = None
    ) -> torch.Tensor:
        """Greedy continuation of ``input_ids`` ([tokens] or [1, tokens]) from an empty cache: the
        prompt and up to ``max_new_tokens`` new tokens, as ``[1, tokens + new]`` (stops after
        ``eos_token_id``, or any of several, when given)."""
        ids = self._check_ids(input_ids)
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        stop = set() if eos_token_id is None else {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
        self.reset()
        self._check_room(ids.shape[0] + max(max_new_tokens - 1, 0))
        new: list[int] = []
        if max_new_tokens > 0:
            if ids.shape[0] > PROMPT_STEP_TOKENS:
                token = self._next_token(self._prefill(ids)[-1:])
            else:
                with _torch_threads(self.threads):
                    for prompt_token in ids.tolist():
                        hidden = self._step(prompt_token)
                    token = self._next_token(hidden)
            new.append(token)
            choice = self.thread_choice
            with _torch_threads(self.threads):
                while len(new) < max_new_tokens and token not in stop:
                    if choice is None:
                        token = self._next_token(self._step(token))
                    else:  # on the thread count that decodes faster now (shared cores)
                        count = choice.next()
                        if count != torch.get_num_threads():
                            torch.set_num_threads(count)
                        started = time.perf_counter()
                        token = self._next_token(self._step(token, count))
                        choice.record(count, time.perf_counter() - started)
                    new.append(token)
        return torch.cat((ids, torch.tensor(new, dtype=ids.dtype)))[None]

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError("input_ids must be an int64 or int32 torch.Tensor")
        if input_ids.dim() == 2 and input_ids.shape[0] == 1:
            input_ids = input_ids[0]
        if input_ids.dim() != 1 or input_ids.numel() == 0:
            raise ValueError(f"input_ids must have shape [tokens] or [1, tokens] with tokens >= 1, got {tuple(input_ids.shape)}")
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= self.vocab:
            raise ValueError(f"input_ids must lie in [0, {self.vocab}), got values in [{int(input_ids.min())}, {int(input_ids.max())}]")
        return input_ids.long()
