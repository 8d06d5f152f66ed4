"""End-to-end greedy decoding speed through Transformers ``generate``, side by side in one run.

Rows (each timed in this process, runs interleaved, median of --repeat):
  * SmolLM2-135M-Instruct dense fp32 and bf16 (the real converted model, aqlm.models.real);
  * the same model with every decoder linear (210) replaced by an AQLM QuantizedLinear of the
    same shape -- random codes, codebooks and scales: a *speed-only* stand-in until a real 2x8g8
    checkpoint is at hand (its text is noise; min_new_tokens keeps every run at --tokens);
    optionally (--compile) with a static cache and torch.compile;
  * llama.cpp via llama-cpp-python (the optional `bench` extra) when installed and --gguf given;
  * a Llama-2-7B-shaped stack (hidden 4096, MLP 11008, 32 heads, 2 decoder layers, vocab 256):
    bf16 dense vs AQLM 2x8g8 and 1x16g8 (random codes), milliseconds per decoder layer per token,
    extrapolated to 32 layers.

    python benchmarks/bench_decode.py [--threads 2] [--tokens 64] [--repeat 3] [--compile] [--gguf PATH]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

import aqlm
from aqlm import QuantizedLinear, pack_codes

PROMPT = "The history of the city of Paris begins"


def random_quantized(linear: nn.Linear, scheme: aqlm.AqlmScheme, param_dtype: torch.dtype, generator) -> QuantizedLinear:
    """A QuantizedLinear of linear's shape with random codes (speed only), scaled like the weight."""
    out_features, in_features = linear.weight.shape
    K = scheme.codebook_size
    codes = torch.randint(0, K, (out_features // scheme.out_group_size, in_features // scheme.in_group_size,
                                 scheme.num_codebooks), generator=generator)
    codebooks = torch.randn(scheme.num_codebooks, K, scheme.out_group_size, scheme.in_group_size, generator=generator)
    scales = torch.full((out_features // scheme.out_group_size, 1, 1, 1), float(linear.weight.float().std()))
    bias = None if linear.bias is None else linear.bias.detach().to(param_dtype)
    return QuantizedLinear.from_parts(
        pack_codes(codes, scheme.nbits_per_codebook), (codebooks / scheme.num_codebooks).to(param_dtype),
        scales.to(param_dtype), bias,
    )


def quantize_decoder_linears(model, scheme_name: str, param_dtype: torch.dtype):
    """A copy of model whose decoder-layer linears are random-code QuantizedLinear layers."""
    scheme = aqlm.AqlmScheme.parse(scheme_name)
    model = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(0)
    names = [name for name, module in model.model.layers.named_modules() if isinstance(module, nn.Linear)]
    for name in names:
        model.model.layers.set_submodule(name, random_quantized(model.model.layers.get_submodule(name), scheme,
                                                                param_dtype, generator))
    return model, len(names)


def generate_seconds(model, input_ids, tokens: int, **kwargs) -> float:
    """Wall time of one greedy generate of exactly `tokens` new tokens."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                             max_new_tokens=tokens, min_new_tokens=tokens, **kwargs)
    assert out.shape[1] == input_ids.shape[1] + tokens
    return time.perf_counter() - start


def time_rows(rows: dict, input_ids, tokens: int, repeat: int) -> dict:
    """Median seconds per row; one warm-up each, then runs interleaved across rows."""
    for model, kwargs in rows.values():
        generate_seconds(model, input_ids, tokens, **kwargs)
    times = {name: [] for name in rows}
    for _ in range(repeat):
        for name, (model, kwargs) in rows.items():
            times[name].append(generate_seconds(model, input_ids, tokens, **kwargs))
    return {name: statistics.median(values) for name, values in times.items()}


def smollm2_rows(args) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aqlm.models.real import RealModelUnavailable, smollm2_dir

    try:
        directory = smollm2_dir()
    except RealModelUnavailable as error:
        print(f"SmolLM2 rows skipped: {error}")
        return
    tokenizer = AutoTokenizer.from_pretrained(directory)
    dense = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    input_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    quantized, count = quantize_decoder_linears(dense, "2x8g8", torch.float16)
    rows = {
        "dense fp32": (dense, {}),
        "dense bf16": (copy.deepcopy(dense).to(torch.bfloat16), {}),
        f"AQLM 2x8g8 ({count} linears, random codes) eager": (quantized, {}),
    }
    if args.compile:
        compiled, _ = quantize_decoder_linears(dense, "2x8g8", torch.float16)
        compiled.forward = torch.compile(compiled.forward)
        rows["AQLM 2x8g8 static cache + torch.compile"] = (compiled, {"cache_implementation": "static"})
    times = time_rows(rows, input_ids, args.tokens, args.repeat)
    print(f"SmolLM2-135M-Instruct, prompt of {input_ids.shape[1]} tokens, {args.tokens} greedy tokens "
          f"(prefill included), {args.threads} threads, median of {args.repeat}")
    base = times["dense fp32"]
    for name, seconds in times.items():
        print(f"  {name:<52} {args.tokens / seconds:7.1f} tok/s   {base / seconds:5.2f}x dense fp32")
    aqlm_row = next(name for name in times if name.startswith("AQLM") and "eager" in name)
    ratio = base / times[aqlm_row]
    print(f"  target: AQLM 2x8g8 >= 2x dense fp32 end to end: {'met' if ratio >= 2 else 'MISSED'} ({ratio:.2f}x)")
    llama_cpp_row(args, tokenizer)


def llama_cpp_row(args, tokenizer) -> None:
    try:
        import llama_cpp
    except ImportError:
        print("  llama.cpp row skipped: llama-cpp-python is not installed (pip install 'aqlm[bench]')")
        return
    if not args.gguf:
        print("  llama.cpp row skipped: give --gguf PATH (a SmolLM2 GGUF)")
        return
    llm = llama_cpp.Llama(model_path=args.gguf, n_threads=args.threads, verbose=False)
    llm(PROMPT, max_tokens=4, temperature=0.0)
    start = time.perf_counter()
    result = llm(PROMPT, max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    seconds = time.perf_counter() - start
    print(f"  {'llama.cpp ' + args.gguf:<52} {result['usage']['completion_tokens'] / seconds:7.1f} tok/s")


def llama7b_rows(args) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=256, max_position_embeddings=512)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()
    for parameter in dense.parameters():
        parameter.requires_grad_(False)
    rows = {"bf16 dense": (dense.to(torch.bfloat16), {})}
    for scheme in ("2x8g8", "1x16g8"):
        rows[f"AQLM {scheme} (random codes)"] = (quantize_decoder_linears(dense, scheme, torch.bfloat16)[0], {})
    input_ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    tokens = max(8, args.tokens // 4)
    times = time_rows(rows, input_ids, tokens, args.repeat)
    print(f"\nLlama-2-7B-shaped decoder layers (hidden 4096, MLP 11008, 2 layers), bf16 activations, {tokens} greedy "
          f"tokens, {args.threads} threads, median of {args.repeat}")
    per_layer = {name: seconds / tokens / config.num_hidden_layers * 1e3 for name, seconds in times.items()}
    base = per_layer["bf16 dense"]
    for name, ms in per_layer.items():
        print(f"  {name:<32} {ms:8.2f} ms/layer/token  x32 layers: {ms * 32:8.1f} ms/token  "
              f"{base / ms:5.2f}x bf16 dense")
    ratio = base / per_layer["AQLM 2x8g8 (random codes)"]
    print(f"  target: AQLM 2x8g8 <= 1/4 of bf16 dense per layer: {'met' if ratio >= 4 else 'MISSED'} ({ratio:.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add the static cache + torch.compile row (slow to compile)")
    parser.add_argument("--gguf", help="a SmolLM2 GGUF for the llama.cpp row")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-7b", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"aqlm {aqlm.__version__}, torch {torch.__version__}, SIMD {aqlm._C.simd_default()} "
          f"(quantized tables: {aqlm._C.lutq_kernel()})\n")
    if not args.skip_smollm2:
        smollm2_rows(args)
    if not args.skip_7b:
        llama7b_rows(args)


if __name__ == "__main__":
    main()
