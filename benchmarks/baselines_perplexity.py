"""WikiText-2 perplexity of a causal LM, dense or after an RTN/GPTQ baseline, with aqlm's own code.

Protocol: ``data/wikitext-2/test.txt`` (the word-level tokenized release, not the raw
split papers use) is read whole, tokenized once with the model's tokenizer (plain call), cut into
non-overlapping windows of ``--seqlen`` and scored by :func:`aqlm.evaluate.perplexity`. GPTQ
calibrates on ``--nsamples`` random windows of ``valid.txt`` (seed 0). ``--windows N`` scores only
the first ``N`` test windows (a cheaper, clearly partial number). One JSON line per run is printed
and appended to ``--results``.

Example::

    python benchmarks/baselines_perplexity.py --method gptq --bits 4 --group-size 128 --nsamples 32
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aqlm.baselines import quantize_model_gptq, quantize_model_rtn
from aqlm.data import calibration_windows, load_tokens
from aqlm.evaluate import perplexity

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="model directory (or hub-style path)")
    parser.add_argument("--gguf-file", default=None, help="GGUF file name inside --model")
    parser.add_argument("--method", choices=("dense", "rtn", "gptq"), default="dense")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--nsamples", type=int, default=128, help="GPTQ calibration windows")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--windows", type=int, default=None, help="score only the first N test windows")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with test.txt and valid.txt")
    parser.add_argument("--results", type=Path, default=None, help="JSON-lines file to append the result to")
    args = parser.parse_args()

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model, gguf_file=args.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(args.model, gguf_file=args.gguf_file, dtype=torch.float32).eval()
    result = {"model": args.model, "gguf_file": args.gguf_file, "method": args.method, "seqlen": args.seqlen,
              "threads": torch.get_num_threads(), "load_s": round(time.perf_counter() - started, 1)}
    if args.method != "dense":
        result.update(bits=args.bits, group_size=args.group_size)
    if args.method == "rtn":
        report = quantize_model_rtn(model, args.bits, args.group_size)
    elif args.method == "gptq":
        valid = load_tokens(args.data / "valid.txt", tokenizer)
        windows = calibration_windows(valid, args.nsamples, args.seqlen, seed=0)
        report = quantize_model_gptq(model, windows, args.bits, args.group_size, batch_size=args.batch_size)
        result.update(nsamples=args.nsamples)
    if args.method != "dense":
        errors = list(report.layer_errors.values())
        result.update(bits_per_weight=report.bits_per_weight, quantize_s=round(report.seconds, 1),
                      mean_layer_error=sum(errors) / len(errors), max_layer_error=max(errors))
    test = load_tokens(args.data / "test.txt", tokenizer)
    if args.windows is not None:
        test = test[: args.windows * args.seqlen]
    evaluation_started = time.perf_counter()
    result["perplexity"] = perplexity(model, test, args.seqlen, batch_size=args.batch_size)
    result.update(test_tokens=test.numel(), windows=test.numel() // args.seqlen,
                  eval_s=round(time.perf_counter() - evaluation_started, 1))
    line = json.dumps(result)
    print(line)
    if args.results is not None:
        with args.results.open("a") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
