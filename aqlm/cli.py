"""``python -m aqlm``: convert real models, quantize, evaluate, and a demo on the bundled defaults."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .argtypes import OneLineErrorParser, int_at_least, scheme_type
from .format import AqlmScheme
from .launch import check_nproc, launch_workers
from .paths import data_file
from .quantize import FinetuneConfig, LayerConfig, QuantizeConfig, quantize_model
from .quantize.presets import add_preset_argument

DEFAULT_MODEL = "smollm2-135m"


def _scheme_from_args(args: argparse.Namespace) -> AqlmScheme:
    if args.scheme:
        return args.scheme
    return AqlmScheme(args.num_codebooks, args.nbits_per_codebook, args.in_group_size, args.out_group_size)


def _resolve_model(name_or_dir: str) -> Path:
    """A model directory, or the name of a bundled real model (converted and cached on first use)."""
    from .models.real import REAL_MODELS, real_model_dir

    if name_or_dir in REAL_MODELS:
        return real_model_dir(name_or_dir)
    path = Path(name_or_dir)
    if not path.exists():
        raise FileNotFoundError(f"model {name_or_dir!r} is neither a directory nor one of {sorted(REAL_MODELS)}")
    return path


def _check_out_before_converting(args: argparse.Namespace) -> None:
    """Refuse a bad ``--out`` before a bundled model is converted on first use (seconds to minutes)."""
    from .fileio import check_output_dir
    from .models.real import REAL_MODELS, real_model_path
    from .quantize.model import PROGRESS_DIR

    model = real_model_path(args.model) if args.model in REAL_MODELS else Path(args.model)
    out = Path(args.out)
    check_output_dir(out, {"input": model}, out / PROGRESS_DIR / "config.json", args.resume, args.overwrite)


# ---- convert ---------------------------------------------------------------------------------


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="convert a real model (smollm2-135m, stories260k, a .gguf or llama2.c .bin) to a dense HF directory"
    )
    parser.add_argument("source", help="smollm2-135m | stories260k | path to a .gguf or llama2.c .bin file")
    parser.add_argument("--out", help="output directory (default: the cache, for the bundled models)")
    parser.set_defaults(run=_run_convert)


def _run_convert(args: argparse.Namespace) -> int:
    from .models import load_gguf, load_llama2c
    from .models.real import REAL_MODELS

    if args.source in REAL_MODELS and args.out is None:
        print(_resolve_model(args.source))
        return 0
    source = Path(args.source)
    if args.out is None:
        raise ValueError("--out is required when converting a file")
    if args.source in REAL_MODELS:
        source = _resolve_model(args.source)
        from transformers import AutoModelForCausalLM

        model, tokenizer = AutoModelForCausalLM.from_pretrained(source), None
    elif source.suffix == ".gguf":
        model, tokenizer = load_gguf(source)
    else:
        model, tokenizer = load_llama2c(source), None
    model.save_pretrained(args.out)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    print(args.out)
    return 0


# ---- quantize --------------------------------------------------------------------------------


def add_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``quantize`` (defaults follow upstream AQLM: 1x16 codebooks, groups of 8, beam 1)."""
    parser.add_argument("model", help="dense Hugging Face model directory, or a bundled model name (smollm2-135m, stories260k)")
    parser.add_argument("--dataset", required=True, help="calibration data: .txt, .jsonl or a .pt token tensor")
    parser.add_argument("--out", required=True,
                        help="output directory (a Hugging Face checkpoint): empty or new, unless --resume or --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out (an unfinished run there is discarded; other files are kept)")
    group = parser.add_argument_group("scheme")
    group.add_argument("--scheme", type=scheme_type, help="shorthand such as 2x8g8 or 1x16g8 (overrides the four options below)")
    group.add_argument("--num-codebooks", type=int_at_least(1), default=1)
    group.add_argument("--nbits-per-codebook", type=int_at_least(1), default=16)
    group.add_argument("--in-group-size", type=int_at_least(1), default=8)
    group.add_argument("--out-group-size", type=int_at_least(1), default=1)
    calibration = parser.add_argument_group("calibration")
    calibration.add_argument("--nsamples", type=int_at_least(1), default=128)
    calibration.add_argument("--val-size", type=int_at_least(0), default=0,
                             help="held-out windows for fine-tuning early stopping")
    calibration.add_argument("--seqlen", type=int_at_least(2), default=2048, help="capped at the model's context length")
    calibration.add_argument("--forward-dtype", choices=["float32", "bfloat16"], default="float32",
                             help="bfloat16: the blocks' forward passes under bfloat16 autocast (fast with AMX/AVX-512 BF16)")
    calibration.add_argument("--no-true-sequential", action="store_true",
                             help="collect every linear's statistics once per block (faster, as upstream's default)")
    layer = parser.add_argument_group("layer optimisation")
    layer.add_argument("--beam-size", type=int_at_least(1), default=1)
    layer.add_argument("--relative-mse-tolerance", type=float, default=0.01)
    layer.add_argument("--max-epochs", type=int_at_least(1), default=1000)
    layer.add_argument("--steps-per-epoch", type=int_at_least(1), default=100)
    layer.add_argument("--lr", type=float, default=1e-4)
    layer.add_argument("--codebook-update", choices=["adam", "lstsq"], default="adam",
                       help="adam (upstream) or lstsq (exact least squares by conjugate gradients)")
    layer.add_argument("--lstsq-tolerance", type=float, default=None,
                       help="lstsq: end a round's solve at the first step that lowers the relative error by less "
                       "than this fraction of it (default: all --steps-per-epoch steps)")
    layer.add_argument("--init-max-iter", type=int_at_least(1), default=100, help="k-means iterations")
    layer.add_argument("--init-max-points-per-centroid", type=int_at_least(0), default=256,
                       help="k-means trains on at most this many points per centroid (0: all points)")
    tune = parser.add_argument_group("block fine-tuning")
    tune.add_argument("--finetune-max-epochs", type=int_at_least(0), default=5)
    tune.add_argument("--finetune-early-stop", type=int, default=3)
    tune.add_argument("--finetune-lr", type=float, default=1e-5)
    tune.add_argument("--finetune-batch-size", type=int_at_least(1), default=1)
    tune.add_argument("--finetune-adam-beta1", type=float, default=0.9)
    tune.add_argument("--finetune-adam-beta2", type=float, default=0.95)
    tune.add_argument("--finetune-dtype", choices=["float32", "bfloat16"], default="float32",
                      help="bfloat16: matrix products of the training steps in bfloat16 (fast with AMX/AVX-512 BF16)")
    parser.add_argument("--param-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                        help="storage dtype of codebooks and scales")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="CPU threads per process (default: torch's; 1 under torchrun and --nproc)")
    parser.add_argument("--nproc", type=int, default=None,
                        help="share the work between N processes on this machine (started with torchrun); "
                        "the checkpoint is the same as with one process with --threads x N threads")
    parser.add_argument("--resume", action="store_true", help="continue a killed run from its last finished block")
    parser.add_argument("--no-progress", action="store_true")
    add_preset_argument(parser)


def quantize_config_from_args(args: argparse.Namespace) -> QuantizeConfig:
    """The QuantizeConfig described by parsed ``quantize`` options."""
    layer = LayerConfig(
        scheme=_scheme_from_args(args),
        beam_size=args.beam_size,
        max_epochs=args.max_epochs,
        relative_mse_tolerance=args.relative_mse_tolerance,
        steps_per_epoch=args.steps_per_epoch,
        lr=args.lr,
        codebook_update=args.codebook_update,
        lstsq_tolerance=args.lstsq_tolerance,
        init_max_iter=args.init_max_iter,
        init_max_points_per_centroid=args.init_max_points_per_centroid or None,
        seed=args.seed,
        num_threads=args.threads,
    )
    finetune = FinetuneConfig(
        max_epochs=args.finetune_max_epochs,
        early_stop=args.finetune_early_stop,
        lr=args.finetune_lr,
        beta1=args.finetune_adam_beta1,
        beta2=args.finetune_adam_beta2,
        batch_size=args.finetune_batch_size,
        dtype=args.finetune_dtype,
    )
    return QuantizeConfig(
        layer=layer, finetune=finetune, nsamples=args.nsamples, val_size=args.val_size, seqlen=args.seqlen,
        seed=args.seed, true_sequential=not args.no_true_sequential, param_dtype=args.param_dtype,
        forward_dtype=args.forward_dtype,
    )


def _add_quantize(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="AQLM-quantize a dense model into a Hugging Face checkpoint")
    add_quantize_arguments(parser)
    parser.set_defaults(run=_run_quantize)


def _run_quantize(args: argparse.Namespace) -> int:
    from .distributed import process_group

    nproc = check_nproc(args.nproc, os.environ)
    config = quantize_config_from_args(args)
    if nproc > 1:
        return launch_workers(nproc, args.command_line)
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_out_before_converting(args)
    model_dir = _resolve_model(args.model)
    with process_group(torch.device("cpu")) as world:  # quantize_model keeps the model on the CPU
        report = quantize_model(model_dir, args.dataset, args.out, config, resume=args.resume,
                                progress=not args.no_progress, overwrite=args.overwrite, world=world)
    if world.is_main:
        print(f"saved {report.out_dir}")
    return 0


# ---- eval ------------------------------------------------------------------------------------


def _add_finetune(subparsers) -> None:
    from .pv_tuning import cli as pv_cli

    parser = subparsers.add_parser(
        "finetune", help="PV-Tuning of an AQLM checkpoint: codes, codebooks and scales distilled from the dense model"
    )
    pv_cli.add_arguments(parser)
    parser.set_defaults(run=pv_cli.run)


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity (text or tokens) or KL to a reference model")
    parser.add_argument("model", help="model directory (dense or AQLM) or a bundled model name")
    parser.add_argument("--dataset", required=True, help=".txt/.jsonl text (needs a tokenizer) or a .pt token tensor")
    parser.add_argument("--seqlen", type=int_at_least(2), default=2048)
    parser.add_argument("--max-windows", type=int_at_least(1), default=None, help="evaluate only the first N windows")
    parser.add_argument("--batch-size", type=int_at_least(1), default=1)
    parser.add_argument("--reference", help="also report KL(reference || model) on the same windows")
    parser.add_argument("--threads", type=int_at_least(1), default=None)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the models' float parameters and activations; bfloat16 is faster on CPUs "
                             "with AVX512-BF16 or AMX (the AQLM layers then use their bfloat16 kernels)")
    parser.set_defaults(run=_run_eval)


def load_model(path: Path, dtype: Optional[torch.dtype] = None):
    """A causal LM (dense or AQLM) in evaluation mode and its tokenizer (or None), its float
    parameters in ``dtype`` (None: as Transformers loads them); see :func:`aqlm.hf.load_causal_lm`."""
    from .hf import load_causal_lm

    return load_causal_lm(path, dtype=dtype)


def evaluate_model(model, tokenizer, dataset, seqlen: int, max_windows: Optional[int], batch_size: int = 1,
                   reference=None, progress: bool = True) -> dict:
    """Perplexity of ``model`` on the first ``max_windows`` windows of ``dataset`` (and KL to ``reference``)."""
    from .data import evaluation_windows, load_tokens
    from .evaluate import kl_divergence, perplexity

    seqlen = min(seqlen, getattr(model.config, "max_position_embeddings", seqlen))
    tokens = load_tokens(dataset, tokenizer)
    if max_windows is not None:
        tokens = tokens[: max_windows * seqlen]
    result = {"seqlen": seqlen, "windows": tokens.numel() // seqlen,
              "perplexity": perplexity(model, tokens, seqlen, batch_size=batch_size, progress=progress)}
    if reference is not None:
        windows = evaluation_windows(tokens, seqlen)
        result["kl_to_reference"] = kl_divergence(model, reference, windows, batch_size=batch_size, progress=progress)
    return result


def _run_eval(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = load_model(_resolve_model(args.model), dtype)
    reference = load_model(_resolve_model(args.reference), dtype)[0] if args.reference else None
    result = evaluate_model(model, tokenizer, args.dataset, args.seqlen, args.max_windows, args.batch_size, reference)
    print(json.dumps({**result, "dtype": args.dtype}, indent=2))
    return 0


# ---- generate ---------------------------------------------------------------------------------


def _add_generate(subparsers) -> None:
    from .decode import LM_HEAD_MODES

    parser = subparsers.add_parser(
        "generate", help="greedy text from a model (dense or AQLM) by the lean CPU loop aqlm.decode.LlamaDecoder"
    )
    parser.add_argument("model", help="model directory (dense or AQLM) or a bundled model name")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue (needs the model's tokenizer)")
    prompt.add_argument("--prompt-ids", type=_token_ids, help="comma-separated token ids to continue (any model)")
    parser.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    parser.add_argument("--lm-head", choices=LM_HEAD_MODES, default="exact",
                        help="LM head weights: as stored (exact), a bfloat16 copy (half the bytes per token) or "
                             "int8 rows with a float32 scale each (a quarter of float32's bytes; also with "
                             "--transformers, by aqlm.quantize_lm_head)")
    parser.add_argument("--transformers", action="store_true",
                        help="use Transformers' generate instead (any architecture; slower on the CPU)")
    parser.add_argument("--threads", type=int_at_least(1), default=None)
    parser.set_defaults(run=_run_generate)


def _token_ids(text: str) -> list[int]:
    """``--prompt-ids``: comma-separated non-negative integers."""
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {text!r}")
    return ids


def _run_generate(args: argparse.Namespace) -> int:
    from .decode import LlamaDecoder
    from .int8_head import quantize_lm_head

    if args.transformers and args.lm_head == "bf16":
        raise ValueError("--lm-head bf16 applies to aqlm.decode.LlamaDecoder; with --transformers use exact or int8")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(_resolve_model(args.model))
    if args.prompt_ids is not None:
        ids = torch.tensor([args.prompt_ids])
    elif tokenizer is None:
        raise ValueError(f"{args.model} has no tokenizer, so a text prompt cannot be encoded: give --prompt-ids")
    else:
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    eos = model.generation_config.eos_token_id if tokenizer is None else tokenizer.eos_token_id
    if args.transformers and args.lm_head == "int8":
        quantize_lm_head(model)
    if not args.transformers:  # built (kernels chosen, cache allocated) outside the timing
        decoder = LlamaDecoder(model, max_length=ids.shape[1] + args.max_new_tokens, lm_head=args.lm_head)
    started = time.perf_counter()
    if args.transformers:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.max_new_tokens, eos_token_id=eos, pad_token_id=eos)
    else:
        out = decoder.generate(ids, args.max_new_tokens, eos_token_id=eos)
    seconds = time.perf_counter() - started
    new = out.shape[1] - ids.shape[1]
    print(",".join(map(str, out[0].tolist())) if tokenizer is None else tokenizer.decode(out[0], skip_special_tokens=True))
    print(f"{new} new tokens after a {ids.shape[1]}-token prompt in {seconds:.2f} s: {new / seconds:.1f} tokens/s "
          f"({'Transformers generate' if args.transformers else 'aqlm.decode.LlamaDecoder'}, "
          f"{torch.get_num_threads()} threads)", file=sys.stderr)
    return 0


# ---- demo: the main job on the bundled defaults ------------------------------------------------


DEMO_MODEL = "stories260k"
DEMO_SCHEME = "4x4g4"
# Below this many parameters the demo runs on one thread unless --threads says otherwise: every
# operation is microseconds long, so a second thread only adds synchronisation, and when the
# cores are shared each synchronisation can wait for a descheduled thread (measured on a loaded
# 2-core machine: the whole demo took 177 s on one thread; on two, 9 minutes reached only block 3 of 5).
SMALL_MODEL_PARAMETERS = 10_000_000


def _add_demo(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="quantize the real model bundled in data/ (stories260K) and print its quality before/after",
        description="The main job on the bundled defaults: AQLM-quantize a real model and compare it with the dense "
        "model and with round-to-nearest at no fewer bits per weight. Models with a tokenizer are calibrated on "
        "WikiText-2 valid.txt and scored by perplexity on test.txt; models without one (stories260K) are "
        "calibrated and scored on token sequences sampled from the dense model (perplexity and KL to it).",
    )
    parser.add_argument("--model", default=DEMO_MODEL, help="bundled model name or dense model directory")
    parser.add_argument("--out", default="aqlm-demo", help="output directory (empty or new, unless --resume or --overwrite)")
    parser.add_argument("--scheme", type=scheme_type, default=DEMO_SCHEME,
                        help="AQLM scheme (default 4x4g4: 16-codeword codebooks, small beside a 64-wide model's layers)")
    parser.add_argument("--nsamples", type=int_at_least(1), default=64, help="calibration sequences")
    parser.add_argument("--seqlen", type=int_at_least(2), default=256, help="tokens per calibration and test sequence")
    parser.add_argument("--eval-sequences", type=int_at_least(1), default=32, help="test sequences (windows)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help=f"CPU threads (default: 1 for models under {SMALL_MODEL_PARAMETERS:,} parameters, else torch's)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted demo run in --out")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    parser.set_defaults(run=_run_demo)


def _demo_data(model, tokenizer, out: Path, args: argparse.Namespace) -> tuple:
    """Calibration data and test windows: WikiText-2 for models with a tokenizer, else sampled sequences."""
    from .data import evaluation_windows, load_tokens
    from .evaluate import sample_sequences

    if tokenizer is not None:
        test = load_tokens(data_file("wikitext-2", "test.txt"), tokenizer)
        windows = evaluation_windows(test, args.seqlen)[: args.eval_sequences]
        return data_file("wikitext-2", "valid.txt"), windows, "WikiText-2 test.txt"
    out.mkdir(parents=True, exist_ok=True)
    samples = out / "demo_samples.pt"
    total = args.nsamples + args.eval_sequences
    tokens = torch.load(samples, weights_only=True) if samples.is_file() else None
    if tokens is None or tuple(tokens.shape) != (total, args.seqlen):
        bos = model.config.bos_token_id if model.config.bos_token_id is not None else 1
        tokens = sample_sequences(model, total, args.seqlen, seed=1234, bos_token_id=bos)
        torch.save(tokens, samples)
    calibration = out / "demo_calibration.pt"
    torch.save(tokens[: args.nsamples].clone(), calibration)
    return calibration, tokens[args.nsamples :], f"{args.eval_sequences} sequences sampled from the dense model"


def _demo_quality(model, reference, windows: torch.Tensor) -> dict:
    from .evaluate import kl_divergence, perplexity

    quality = {"perplexity": perplexity(model, windows.reshape(-1), windows.shape[1], progress=False)}
    quality["kl"] = 0.0 if model is reference else kl_divergence(model, reference, windows, progress=False)
    return quality


def _run_demo(args: argparse.Namespace) -> int:
    import copy
    import math

    from .baselines import quantize_model_rtn, rtn_bits_per_weight

    started = time.perf_counter()
    scheme = args.scheme
    _check_out_before_converting(args)
    model_dir = _resolve_model(args.model)
    out = Path(args.out)
    dense, tokenizer = load_model(model_dir)
    threads = args.threads
    if threads is None and sum(p.numel() for p in dense.parameters()) < SMALL_MODEL_PARAMETERS:
        threads = 1
    if threads:
        torch.set_num_threads(threads)
    calibration, windows, described = _demo_data(dense, tokenizer, out, args)
    config = QuantizeConfig(
        layer=LayerConfig(scheme=scheme, max_epochs=8, steps_per_epoch=20, codebook_update="lstsq",
                          num_threads=threads),
        finetune=FinetuneConfig(max_epochs=2, lr=1e-4),
        nsamples=args.nsamples,
        seqlen=args.seqlen,
    )
    print(f"model {model_dir}\ncalibration {calibration} ({config.nsamples} windows of {config.seqlen} tokens)")
    report = quantize_model(model_dir, calibration, out, config, resume=args.resume, overwrite=not args.resume)
    quantized, _ = load_model(out)
    rtn_bits = max(2, math.floor(report.bits_per_weight))
    group = next(g for g in (128, 64, 32, 16, 8, 4) if rtn_bits_per_weight(rtn_bits, g) >= report.bits_per_weight
                 or g == 4)
    rtn = copy.deepcopy(dense)
    quantize_model_rtn(rtn, rtn_bits, group)
    rows = [
        ("dense float32", 32.0, _demo_quality(dense, dense, windows)),
        (f"RTN {rtn_bits}-bit g{group}", rtn_bits_per_weight(rtn_bits, group), _demo_quality(rtn, dense, windows)),
        (f"AQLM {scheme.name}", report.bits_per_weight, _demo_quality(quantized, dense, windows)),
    ]
    print(f"\nquality on {described} ({windows.shape[0]} windows of {windows.shape[1]} tokens):")
    print(f"  {'':<18} {'bits/weight':>11} {'perplexity':>11} {'KL to dense':>12}")
    for name, bits, quality in rows:
        print(f"  {name:<18} {bits:11.2f} {quality['perplexity']:11.3f} {quality['kl']:12.4f}")
    print(f"bits/weight of the quantized layers, codebooks and scales (RTN: scales and zeros) included\n"
          f"checkpoint: {out.resolve()}   total time {time.perf_counter() - started:.0f} s")
    return 0


# ---- entry point -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m aqlm`` argument parser."""
    parser = OneLineErrorParser(prog="python -m aqlm", description="AQLM and PV-Tuning for LLMs, with a C core.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert(subparsers)
    _add_quantize(subparsers)
    _add_finetune(subparsers)
    _add_eval(subparsers)
    _add_generate(subparsers)
    _add_demo(subparsers)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; errors in the input are reported in one line, not as a traceback."""
    from .models.real import RealModelUnavailable

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = argv  # --nproc starts its workers with the same arguments
    try:
        return args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError, RealModelUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
