"""End-to-end greedy decoding speed through Transformers ``generate``, side by side in one run.

Rows (each timed in this process, runs interleaved, median of --repeat):
  * SmolLM2-135M-Instruct dense fp32 and bf16 (the real converted model, aqlm.models.real);
  * the AQLM 2x8g8 SmolLM2 (default quantized tables, and exact fp32 tables with
    AQLM_QUANTIZED_LUT=0): the real checkpoint given with --checkpoint DIR, else the dense model
    with every decoder linear (210) replaced by an AQLM QuantizedLinear of the same shape with
    random codes, codebooks and scales (a *speed-only* stand-in: its text is noise);
    min_new_tokens keeps every run at --tokens;
  * dense fp32 and AQLM through aqlm.decode.LlamaDecoder, our lean loop (bound C kernels,
    preallocated cache), AQLM also with a bfloat16 copy and an int8 copy of the LM head;
  * with --compile, dense fp32 and AQLM again with a static cache and torch.compile;
  * llama.cpp via llama-cpp-python (the optional `bench` extra), one row per --gguf file (its
    prompt is evaluated afresh on every run, as ours is);
  * a Llama-2-7B-shaped stack (hidden 4096, MLP 11008, 32 heads, 2 decoder layers, vocab 256):
    bf16 dense vs AQLM 2x8g8 and 1x16g8 (random codes; through generate and through
    LlamaDecoder, float32 activations), milliseconds per decoder layer per token,
    extrapolated to 32 layers.
The CPU's model and vector flags and the load average (before and after) are printed with the tables.

    python benchmarks/bench_decode.py [--threads 2] [--tokens 64] [--repeat 3] [--checkpoint DIR]
        [--compile] [--gguf PATH [PATH ...]]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn as nn

import aqlm
from aqlm import QuantizedLinear, pack_codes
from bench_matmul import cpu_flags

PROMPT = "The history of the city of Paris begins"


def random_quantized(linear: nn.Linear, scheme: aqlm.AqlmScheme, param_dtype: torch.dtype, generator) -> QuantizedLinear:
    """A QuantizedLinear of linear's shape with random codes (speed only), scaled like the weight."""
    out_features, in_features = linear.weight.shape
    K = scheme.codebook_size
    codes = torch.randint(0, K, (out_features // scheme.out_group_size, in_features // scheme.in_group_size,
                                 scheme.num_codebooks), generator=generator)
    codebooks = torch.randn(scheme.num_codebooks, K, scheme.out_group_size, scheme.in_group_size, generator=generator)
    scales = torch.full((out_features // scheme.out_group_size, 1, 1, 1), float(linear.weight.detach().float().std()))
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


def generate_row(model, input_ids, tokens: int, **kwargs) -> Callable[[], float]:
    """A row: one timed greedy generate per call."""
    return lambda: generate_seconds(model, input_ids, tokens, **kwargs)


def decoder_row(model, input_ids, tokens: int, lm_head: str = "exact") -> Callable[[], float]:
    """A row: one timed greedy generate of exactly `tokens` tokens by aqlm.decode.LlamaDecoder
    (built once, outside the timing, as a user keeps it between prompts)."""
    from aqlm.decode import LlamaDecoder

    decoder = LlamaDecoder(model, max_length=input_ids.shape[1] + tokens, lm_head=lm_head)

    def run() -> float:
        start = time.perf_counter()
        out = decoder.generate(input_ids, tokens)
        assert out.shape[1] == input_ids.shape[1] + tokens
        return time.perf_counter() - start

    return run


def with_environment(run: Callable[[], float], **variables: str) -> Callable[[], float]:
    """The row ``run`` with environment variables set while it runs (the kernel choice reads them per call)."""

    def wrapped() -> float:
        saved = {name: os.environ.get(name) for name in variables}
        os.environ.update(variables)
        try:
            return run()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    return wrapped


def time_rows(rows: dict, repeat: int) -> dict:
    """Median seconds per row (each a function returning the seconds of one run); one warm-up
    each, then runs interleaved across rows, so that load changes hit every row alike."""
    for run in rows.values():
        run()
    times = {name: [] for name in rows}
    for _ in range(repeat):
        for name, run in rows.items():
            times[name].append(run())
    return {name: statistics.median(values) for name, values in times.items()}


def load_line() -> str:
    """The 1/5/15-minute load averages and the core count (other work on the cores skews every row)."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def compiled(model: nn.Module) -> nn.Module:
    """``model`` with its forward compiled by torch.compile (run it with a static cache)."""
    model.forward = torch.compile(model.forward)
    return model


def aqlm_models(args, dense, count: int) -> tuple[str, Callable[[], nn.Module]]:
    """The AQLM row's label and a factory of fresh copies: the --checkpoint, or random codes."""
    if args.checkpoint:
        from aqlm.hf import load_causal_lm

        def load():
            return load_causal_lm(args.checkpoint, kind="aqlm", use_cache=True)[0]

        layers = sum(isinstance(module, QuantizedLinear) for module in load().modules())
        return f"AQLM 2x8g8 checkpoint ({layers} linears)", load
    return f"AQLM 2x8g8 ({count} linears, random codes)", lambda: quantize_decoder_linears(dense, "2x8g8", torch.float16)[0]


def smollm2_rows(args) -> None:
    """The SmolLM2 table: dense, AQLM (eager, optionally compiled) and llama.cpp rows, interleaved."""
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
    count = sum(isinstance(m, nn.Linear) for m in dense.model.layers.modules())
    aqlm_name, aqlm_model = aqlm_models(args, dense, count)
    tokens = args.tokens
    rows = {
        "dense fp32": generate_row(dense, input_ids, tokens),
        "dense bf16": generate_row(copy.deepcopy(dense).to(torch.bfloat16), input_ids, tokens),
        f"{aqlm_name} eager": generate_row(aqlm_model(), input_ids, tokens),
        f"{aqlm_name} eager, exact tables (AQLM_QUANTIZED_LUT=0)": with_environment(
            generate_row(aqlm_model(), input_ids, tokens), AQLM_QUANTIZED_LUT="0"),
        f"{aqlm_name} eager, int8 head (aqlm.quantize_lm_head)": generate_row(
            aqlm.quantize_lm_head(aqlm_model()), input_ids, tokens),
    }
    loop = "aqlm.decode.LlamaDecoder"
    rows[f"dense fp32, {loop}"] = decoder_row(dense, input_ids, tokens)
    rows[f"{aqlm_name}, {loop}"] = decoder_row(aqlm_model(), input_ids, tokens)
    rows[f"{aqlm_name}, {loop}, bf16 head"] = decoder_row(aqlm_model(), input_ids, tokens, lm_head="bf16")
    rows[f"{aqlm_name}, {loop}, int8 head"] = decoder_row(aqlm_model(), input_ids, tokens, lm_head="int8")
    if args.compile:
        static = {"cache_implementation": "static"}
        rows["dense fp32 static cache + torch.compile"] = generate_row(compiled(copy.deepcopy(dense)), input_ids, tokens, **static)
        rows[f"{aqlm_name} static cache + torch.compile"] = generate_row(compiled(aqlm_model()), input_ids, tokens, **static)
    for path in args.gguf or []:
        run = llama_cpp_row(path, args.threads, tokens)
        if run is not None:
            rows[f"llama.cpp {os.path.basename(path)}"] = run
    print(f"SmolLM2-135M-Instruct, prompt of {input_ids.shape[1]} tokens, {tokens} greedy tokens "
          f"(prefill included), {args.threads} threads, median of {args.repeat}; before: {load_line()}")
    times = time_rows(rows, args.repeat)
    base = times["dense fp32"]
    for name, seconds in times.items():
        print(f"  {name:<60} {tokens / seconds:7.1f} tok/s   {base / seconds:5.2f}x dense fp32")
    ratio = base / times[f"{aqlm_name} eager"]
    int8_ratio = base / times[f"{aqlm_name} eager, int8 head (aqlm.quantize_lm_head)"]
    print(f"  target: AQLM 2x8g8 >= 2x dense fp32 end to end: {'met' if ratio >= 2 else 'MISSED'} ({ratio:.2f}x, eager; "
          f"{int8_ratio:.2f}x with the int8 head)")
    if args.compile:
        dense_compiled = times["dense fp32 static cache + torch.compile"]
        aqlm_compiled = times[f"{aqlm_name} static cache + torch.compile"]
        print(f"  compiled against compiled: {dense_compiled / aqlm_compiled:.2f}x; fastest AQLM row against the "
              f"fastest dense row: {min(base, dense_compiled, times['dense bf16']) / min(times[f'{aqlm_name} eager'], aqlm_compiled):.2f}x")
    ours = times[f"{aqlm_name}, {loop}"]
    print(f"  {loop}: AQLM {base / ours:.2f}x dense fp32 through generate, "
          f"{times[f'dense fp32, {loop}'] / ours:.2f}x dense fp32 in the same loop")
    llama = {name: seconds for name, seconds in times.items() if name.startswith("llama.cpp")}
    if llama:
        best = min(llama, key=llama.get)
        fastest_ours = min(seconds for name, seconds in times.items() if name.startswith("AQLM"))
        print(f"  fastest AQLM row vs {best}: {llama[best] / fastest_ours:.2f}x its tokens/s")
    print(f"  after: {load_line()}")


def llama_cpp_row(path: str, threads: int, tokens: int) -> Optional[Callable[[], float]]:
    """A row timing llama.cpp greedy decoding of ``path`` (None, with the reason printed, if it cannot run)."""
    try:
        import llama_cpp
    except (ImportError, OSError, RuntimeError) as error:  # not installed, or its shared library not found
        print(f"  llama.cpp row for {path} skipped: llama-cpp-python does not load ({error}); "
              "pip install 'aqlm[bench]', or set LLAMA_CPP_LIB_PATH to a built llama.cpp")
        return None
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, verbose=False)
    prompt = llm.tokenize(PROMPT.encode())

    def run() -> float:
        """Greedy tokens from llama.cpp's own loop, which stops only when told (no end-of-text
        stop); reset=True evaluates the prompt afresh, as generate does."""
        start = time.perf_counter()
        produced = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            produced += 1
            if produced == tokens:
                break
        return time.perf_counter() - start

    return run


def llama7b_rows(args) -> None:
    """Llama-2-7B-shaped layers: ms per decoder layer per decoded token, prefill excluded (the
    difference between generating ``3 * tokens`` and ``tokens`` tokens after the same prompt),
    with the figure that includes the prompt's prefill beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=256, max_position_embeddings=512)
    torch.manual_seed(0)
    dense = LlamaForCausalLM(config).eval()
    for parameter in dense.parameters():
        parameter.requires_grad_(False)
    input_ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    short = max(8, args.tokens // 4)
    long = 3 * short
    models = {"bf16 dense": (dense.to(torch.bfloat16), False)}
    for scheme in ("2x8g8", "1x16g8"):
        quantized = quantize_decoder_linears(dense, scheme, torch.bfloat16)[0]
        models[f"AQLM {scheme} (random codes)"] = (quantized, False)
        models[f"AQLM {scheme} (random codes), LlamaDecoder"] = (quantized, True)
    rows = {}
    for name, (model, lean) in models.items():
        for count in (short, long):
            rows[(name, count)] = (decoder_row(model, input_ids, count) if lean else generate_row(model, input_ids, count))
    times = time_rows(rows, args.repeat)
    print(f"\nLlama-2-7B-shaped decoder layers (hidden 4096, MLP 11008, 2 layers), bf16 activations, prompt of "
          f"{input_ids.shape[1]} tokens, {args.threads} threads, median of {args.repeat}; after: {load_line()}")
    layers = config.num_hidden_layers
    decode = {name: (times[(name, long)] - times[(name, short)]) / (long - short) / layers * 1e3 for name in models}
    with_prefill = {name: times[(name, short)] / short / layers * 1e3 for name in models}
    base, base_prefill = decode["bf16 dense"], with_prefill["bf16 dense"]
    for name, ms in decode.items():
        print(f"  {name:<42} {ms:8.2f} ms/layer/token decoding ({base / ms:5.2f}x bf16 dense), x32 layers: "
              f"{ms * 32:7.1f} ms/token;  {with_prefill[name]:7.2f} over {short} tokens with the prompt's prefill "
              f"({base_prefill / with_prefill[name]:5.2f}x)")
    best = min(decode["AQLM 2x8g8 (random codes)"], decode["AQLM 2x8g8 (random codes), LlamaDecoder"])
    print(f"  target: AQLM 2x8g8 <= 1/4 of bf16 dense per layer per decoded token: "
          f"{'met' if base / best >= 4 else 'MISSED'} ({base / best:.2f}x, the faster of generate and LlamaDecoder)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add the static cache + torch.compile row (slow to compile)")
    parser.add_argument("--checkpoint", help="a real AQLM 2x8g8 SmolLM2 checkpoint (Hugging Face directory); "
                        "without it the AQLM rows use random codes")
    parser.add_argument("--gguf", nargs="+", action="extend", metavar="PATH",
                        help="SmolLM2 GGUF files, one llama.cpp row each")
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-7b", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"aqlm {aqlm.__version__}, torch {torch.__version__}, SIMD {aqlm._C.simd_default()} "
          f"(quantized tables: {aqlm._C.lutq_kernel()}, exact tables only: {aqlm.ops.exact_lut_requested()})")
    print(f"CPU: {cpu_flags()}; {load_line()}\n")
    if not args.skip_smollm2:
        smollm2_rows(args)
    if not args.skip_7b:
        llama7b_rows(args)


if __name__ == "__main__":
    main()
