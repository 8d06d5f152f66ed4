"""Perplexity of an AQLM checkpoint decoded token by token (KV cache), exact fp32 tables against
the default quantized tables (16-bit entries in two int8 tables): the decode path that
prefill-based perplexity never exercises.

    python benchmarks/lut_accuracy.py CHECKPOINT [--windows 2] [--seqlen 1024] [--threads 2] [--step 1]
        (--step N: N tokens a call, as chunked prefill or speculative decoding send them)
    python benchmarks/lut_accuracy.py CHECKPOINT --layer-tokens 64   (per-linear output errors)
    python benchmarks/lut_accuracy.py CHECKPOINT --lm-heads exact,bf16,int8   (aqlm.decode.LlamaDecoder's
        step, default tables, one perplexity per LM-head mode)

Each setting runs in its own process (the kernel choice reads the environment once per weight).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time


def decode_perplexity(checkpoint: str, windows: int, seqlen: int, step: int = 1) -> dict:
    """Perplexity of the first ``windows`` windows of WikiText-2 test.txt, fed ``step`` tokens a
    call (1: token by token) through the KV cache."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from aqlm.data import evaluation_windows, load_tokens
    from aqlm.evaluate import kv_cache_keyword
    from aqlm.paths import data_file

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    cache_name = kv_cache_keyword(model)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokens = load_tokens(data_file("wikitext-2", "test.txt"), tokenizer)
    total, count, started = 0.0, 0, time.perf_counter()
    with torch.no_grad():
        for window in evaluation_windows(tokens, seqlen)[:windows]:
            cache = DynamicCache()
            for position in range(0, seqlen - 1, step):
                end = min(position + step, seqlen - 1)
                logits = model(input_ids=window[position:end].view(1, -1), use_cache=True,
                               **{cache_name: cache}).logits[0].float()
                logprobs = torch.log_softmax(logits, -1)
                total -= float(logprobs.gather(1, window[position + 1 : end + 1].view(-1, 1)).sum())
                count += end - position
    return {"perplexity": math.exp(total / count), "tokens": count, "seconds": time.perf_counter() - started}


def decoder_perplexities(checkpoint: str, windows: int, seqlen: int, heads: list[str]) -> None:
    """Token-by-token perplexity through aqlm.decode.LlamaDecoder's step, once per LM-head mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aqlm.data import evaluation_windows, load_tokens
    from aqlm.decode import LlamaDecoder
    from aqlm.paths import data_file

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    selected = evaluation_windows(load_tokens(data_file("wikitext-2", "test.txt"), tokenizer), seqlen)[:windows]
    results = {}
    for head in heads:
        decoder, total, count, started = LlamaDecoder(model, max_length=seqlen, lm_head=head), 0.0, 0, time.perf_counter()
        for window in selected:
            logits = decoder.logits(window[:-1], one_by_one=True)
            total -= float(torch.log_softmax(logits, -1).gather(1, window[1:, None]).sum())
            count += window.numel() - 1
        results[head] = math.exp(total / count)
        print(f"LlamaDecoder, {head} LM head: perplexity {results[head]:.4f} over {count} tokens decoded one at a time, "
              f"{count / (time.perf_counter() - started):.1f} tok/s")
    first = heads[0]
    for head in heads[1:]:
        print(f"relative change of the {head} head against the {first} head: "
              f"{100 * (results[head] - results[first]) / results[first]:+.3f}%")


def layer_errors(checkpoint: str, tokens: int) -> None:
    """Per linear, the relative output error ||y_lutq - y_lut|| / ||y_lut|| of the two C kernels
    (for codebooks of more than 256 codewords, ||y_decodeq - y_decode|| / ||y_decode||)
    on the real inputs of that linear (one prefill of ``tokens`` WikiText-2 test tokens, every token
    sent through the kernels one at a time, as decoding does)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aqlm import QuantizedLinear, ops
    from aqlm.data import load_tokens
    from aqlm.paths import data_file

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = load_tokens(data_file("wikitext-2", "test.txt"), tokenizer)[:tokens].view(1, -1)
    inputs = {}
    linears = {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
    for name, module in linears.items():
        module.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0].detach().reshape(-1, module.in_features)))
    with torch.no_grad():
        model(ids)
        errors = {}
        for name, module in linears.items():
            weight = (module.codes, module.codebooks, module.scales, None)
            x = inputs[name]
            tables = module.scheme.nbits_per_codebook <= 8  # else int8 codebooks against exact decoding
            exact_kernel, fast_kernel = ("lut", "lutq") if tables else ("decode", "decodeq")
            exact = torch.cat([ops.quantized_matmul_cpu(row[None], *weight, kernel=exact_kernel) for row in x]).double()
            fast = torch.cat([ops.quantized_matmul_cpu(row[None], *weight, kernel=fast_kernel) for row in x]).double()
            errors.setdefault(fast_kernel, {})[name] = float((fast - exact).norm() / exact.norm())
            if not tables and ops.bf16_tiles_apply(16, 1, 8, module.in_features, x.dtype, True):
                tiles = torch.cat([ops.quantized_matmul_cpu(block, *weight, kernel="bf16") for block in x.split(16)]).double()
                errors.setdefault("bf16", {})[name] = float((tiles - exact).norm() / exact.norm())
    for kernel, found in errors.items():
        ranked = sorted(found.values())
        what = {"lutq": "quantized tables", "decodeq": "int8 codebooks", "bf16": "bfloat16 tiles, 16 tokens a call"}[kernel]
        print(f"relative layer-output error of the {what} ({kernel}) over {len(ranked)} linears, {tokens} tokens each: "
              f"min {100 * ranked[0]:.4f}%, median {100 * ranked[len(ranked) // 2]:.4f}%, max {100 * ranked[-1]:.4f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--step", type=int, default=1, help="tokens a call (1: decoding one token at a time)")
    parser.add_argument("--layer-tokens", type=int, default=0,
                        help="instead: per-linear output error of the two kernels on this many tokens' real inputs")
    parser.add_argument("--lm-heads", default=None,
                        help="instead: comma-separated LM-head modes of aqlm.decode.LlamaDecoder (exact, bf16, int8)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lm_heads:
        import torch

        torch.set_num_threads(args.threads)
        decoder_perplexities(args.checkpoint, args.windows, args.seqlen, args.lm_heads.split(","))
        return
    if args.layer_tokens:
        layer_errors(args.checkpoint, args.layer_tokens)
        return
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(decode_perplexity(args.checkpoint, args.windows, args.seqlen, args.step)))
        return
    results = {}
    for name, quantized in (("exact fp32 tables", "0"), ("quantized tables", "1")):
        env = dict(os.environ, AQLM_QUANTIZED_LUT=quantized, AQLM_KERNEL_CALIBRATION="0")
        env.pop("AQLM_CPU_KERNEL", None)
        child = subprocess.run([sys.executable, __file__, args.checkpoint, "--windows", str(args.windows), "--seqlen",
                                str(args.seqlen), "--threads", str(args.threads), "--step", str(args.step), "--child"],
                               env=env, capture_output=True, text=True, check=True)
        results[name] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{name:>22}: perplexity {results[name]['perplexity']:.4f} over {results[name]['tokens']} tokens "
              f"decoded {args.step} at a time, {results[name]['tokens'] / results[name]['seconds']:.1f} tok/s")
    exact, fast = (results[k]["perplexity"] for k in results)
    print(f"relative change of the quantized tables: {100 * (fast - exact) / exact:+.3f}% (target: within 0.3%)")


if __name__ == "__main__":
    main()
