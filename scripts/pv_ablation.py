"""P-only versus PV tuning of one AQLM checkpoint, with the same budget and data.

From a quantized checkpoint, run (1) P-only tuning (codebooks and scales; codes frozen) and
(2) full PV tuning (the same, plus the V step on the codes). Every run has the same data, steps
and batch size. P-only is run for each ``--lr`` and the best by validation (the held-out tail of
the calibration data) is kept; PV reuses that learning rate for the P step and is run for each
``--code-lr`` x ``--delta-decay``, again keeping the best by validation. The script prints
perplexity and KL divergence to the dense model on the test data before tuning, after P-only and
after PV (each read back from its saved checkpoint), and every candidate's numbers.

Presets (data and quantization are prepared in --work when not given):

* ``stories260k``: llama2.c stories260K has no tokenizer, so calibration and test data are token
  sequences sampled from the dense model (``model.generate(do_sample=True)``, KV cache, fixed
  seeds); the dense model is quantized with ``--scheme`` (hidden size 172 needs group size 4).
* ``smollm2``: SmolLM2-135M-Instruct, calibrated on WikiText-2 ``valid.txt`` and evaluated on the
  first ``--test-windows`` windows of ``test.txt`` (word-level tokenized release); quantized with
  ``--scheme`` (default 2x8g8) and fast settings.

Examples::

    python scripts/pv_ablation.py --preset stories260k --scheme 1x8g4 --work /tmp/pv_stories_1x8g4
    python scripts/pv_ablation.py --preset smollm2 --scheme 2x8g8 --work /tmp/pv_smollm2 --steps 40 \\
        --lr 1e-3 --code-lr 1e-2 --delta-decay 0
    python scripts/pv_ablation.py --dense DENSE --quantized AQLM --train calib.pt --test test.pt --work OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from aqlm.data import held_out_windows, load_tokens, token_rows  # noqa: E402
from aqlm.format import AqlmScheme  # noqa: E402
from aqlm.pv_tuning import PVConfig, evaluate_student, pv_tune  # noqa: E402
from aqlm.quantize import FinetuneConfig, LayerConfig, QuantizeConfig, quantize_model  # noqa: E402


def sample_token_sequences(model_dir: Path, count: int, length: int, seed: int, bos_token_id: int = 1) -> torch.Tensor:
    """``[count, length]`` token ids sampled from the model at temperature 1, each starting with BOS.

    Uses ``generate(do_sample=True)`` with the KV cache; the global torch RNG is seeded with ``seed``.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = torch.full((count, 1), bos_token_id, dtype=torch.long)
    torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(
            prompt, do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=length - 1,
            min_new_tokens=length - 1, use_cache=True, pad_token_id=0,
        )


def cached_samples(path: Path, model_dir: Path, count: int, length: int, seed: int) -> Path:
    """Sample once into ``path`` (a .pt file) and reuse it afterwards."""
    if not path.exists():
        started = time.perf_counter()
        tokens = sample_token_sequences(model_dir, count, length, seed)
        torch.save(tokens, path)
        print(f"sampled {count} x {length} tokens (seed {seed}) into {path} in {time.perf_counter() - started:.0f} s")
    return path


def quantize_if_needed(
    dense_dir: Path, calibration: Path, out_dir: Path, scheme: str, seqlen: int, nsamples: int
) -> Path:
    """Quantize ``dense_dir`` with fast settings into ``out_dir`` unless it already holds a checkpoint."""
    if not (out_dir / "config.json").exists():
        config = QuantizeConfig(
            layer=LayerConfig(
                scheme=AqlmScheme.parse(scheme), max_epochs=4, steps_per_epoch=20, codebook_update="lstsq"
            ),
            finetune=FinetuneConfig(max_epochs=1),
            nsamples=nsamples,
            seqlen=seqlen,
        )
        report = quantize_model(
            dense_dir, calibration, out_dir, config, resume=True, progress=False, log=lambda line: None
        )
        print(report.summary())
    return out_dir


def evaluate_checkpoint(model_dir: Path, teacher, windows: torch.Tensor, batch_size: int) -> dict:
    """Perplexity and KL to the teacher of a saved checkpoint on ``windows``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    result = evaluate_student(model, teacher, windows, batch_size)
    return {"perplexity": result.perplexity, "kl": result.kl}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["stories260k", "smollm2"], help="prepare models and data (see above)")
    parser.add_argument("--scheme", default=None, help="AQLM scheme for the preset's quantization (e.g. 1x8g4)")
    parser.add_argument("--dense", help="dense model directory (overrides the preset)")
    parser.add_argument("--quantized", help="AQLM checkpoint to tune (overrides the preset's quantization)")
    parser.add_argument("--train", help="calibration data (.txt/.jsonl/.pt)")
    parser.add_argument("--test", help="test data (.txt/.jsonl/.pt)")
    parser.add_argument("--work", required=True, help="directory for data, checkpoints and results")
    parser.add_argument("--seqlen", type=int, default=None, help="training and test window length")
    parser.add_argument("--test-windows", type=int, default=None, help="test windows (first ones of --test)")
    parser.add_argument("--nsamples", type=int, default=None, help="calibration windows for tuning")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--microbatch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3],
                        help="P step (codebooks and scales, LAMB) learning rates to try; P-only picks the best")
    parser.add_argument("--code-lr", type=float, nargs="+", default=[1e-2, 3e-2],
                        help="V step learning rates to try (LAMB on the straight-through buffers)")
    parser.add_argument("--delta-decay", type=float, nargs="+", default=[0.0, 0.1], help="V-step variants to try")
    parser.add_argument("--max-code-change-per-step", type=float, default=1e-2)
    parser.add_argument("--code-selection-temperature", type=float, default=0.0)
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-windows", type=int, default=8, help="validation windows (keep-best and selection)")
    parser.add_argument("--select-by", choices=["kl", "perplexity"], default="kl", help="validation metric")
    parser.add_argument("--update-non-quantized-parameters", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def prepare(args: argparse.Namespace, work: Path) -> tuple[Path, Path, Path, Path, int, int, int]:
    """Resolve (dense, quantized, train, test, seqlen, test_windows, nsamples) from the arguments and preset."""
    from aqlm.models import smollm2_dir, stories260k_dir
    from aqlm.paths import data_dir

    if args.preset == "stories260k":
        dense = Path(args.dense) if args.dense else stories260k_dir()
        seqlen = args.seqlen or 256
        train = Path(args.train or cached_samples(work / "stories_train.pt", dense, 144, seqlen, seed=1))
        test = Path(args.test or cached_samples(work / "stories_test.pt", dense, 32, seqlen, seed=2))
        scheme = args.scheme or "1x8g4"
        quantized = Path(args.quantized) if args.quantized else quantize_if_needed(
            dense, train, work / f"quantized_{scheme}", scheme, seqlen, nsamples=64)
        return dense, quantized, train, test, seqlen, args.test_windows or 32, args.nsamples or 128
    if args.preset == "smollm2":
        dense = Path(args.dense) if args.dense else smollm2_dir()
        wikitext = data_dir() / "wikitext-2"
        train = Path(args.train) if args.train else wikitext / "valid.txt"
        test = Path(args.test) if args.test else wikitext / "test.txt"
        scheme = args.scheme or "2x8g8"
        quantized = Path(args.quantized) if args.quantized else quantize_if_needed(
            dense, train, work / f"quantized_{scheme}", scheme, 512, nsamples=32)
        return dense, quantized, train, test, args.seqlen or 256, args.test_windows or 40, args.nsamples or 256
    missing = [name for name in ("dense", "quantized", "train", "test") if getattr(args, name) is None]
    if missing:
        raise SystemExit(f"without --preset, pass --{' --'.join(missing)}")
    return (Path(args.dense), Path(args.quantized), Path(args.train), Path(args.test), args.seqlen or 256,
            args.test_windows or 32, args.nsamples or 128)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dense, quantized, train, test, seqlen, test_windows, nsamples = prepare(args, work)

    from aqlm.quantize.model import load_dense_model

    teacher, tokenizer = load_dense_model(dense)
    rows = token_rows(test)
    windows = held_out_windows(rows if rows is not None else load_tokens(test, tokenizer), seqlen, test_windows)
    results = {
        "dense": {"perplexity": evaluate_student(teacher, teacher, windows, 4).perplexity, "kl": 0.0},
        "before": evaluate_checkpoint(quantized, teacher, windows, 4),
    }
    base = dict(
        nsamples=nsamples, seqlen=seqlen, num_steps=args.steps, batch_size=args.batch_size,
        microbatch_size=args.microbatch_size or args.batch_size,
        max_code_change_per_step=args.max_code_change_per_step,
        code_selection_temperature=args.code_selection_temperature, beam_size=args.beam_size,
        eval_every=args.eval_every, eval_windows=args.eval_windows, save_every=args.eval_every,
        select_by=args.select_by, update_non_quantized_parameters=args.update_non_quantized_parameters,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
    )

    def run(name: str, config: PVConfig) -> dict:
        out = work / name
        if (out / "pv_report.json").exists():
            report = json.loads((out / "pv_report.json").read_text())
        else:
            report = pv_tune(dense, quantized, train, out, config, resume=(out / "pv_checkpoint").exists()).to_dict()
        row = evaluate_checkpoint(out, teacher, windows, 4)
        row.update(
            name=name, seconds=report["seconds"], validation=report["final"][args.select_by],
            mean_codes_changed=sum(s["codes_changed"] for s in report["steps"]) / max(len(report["steps"]), 1),
        )
        print(f"{name}: validation {args.select_by} {row['validation']:.5f}, test perplexity {row['perplexity']:.4f}, "
              f"test KL {row['kl']:.5f}", flush=True)
        return row

    candidates = {"p_only": [run(f"p_only_lr{lr:g}", PVConfig(**base, lr=lr, update_codes=False)) for lr in args.lr]}
    best_p = min(candidates["p_only"], key=lambda row: row["validation"])
    lr = args.lr[candidates["p_only"].index(best_p)]
    candidates["pv"] = [
        run(f"pv_lr{lr:g}_codelr{code_lr:g}_dd{delta_decay:g}",
            PVConfig(**base, lr=lr, code_lr=code_lr, delta_decay=delta_decay, update_codes=True))
        for code_lr in args.code_lr
        for delta_decay in args.delta_decay
    ]
    best_pv = min(candidates["pv"], key=lambda row: row["validation"])
    results["p_only"], results["pv"] = best_p, best_pv

    print(f"\nP-only vs PV: {args.preset or quantized}, {Path(quantized).name}; every run {args.steps} steps x "
          f"{args.batch_size} windows of {seqlen} tokens; test: {windows.shape[0]} windows of {seqlen} from {test}")
    print(f"selection by validation {args.select_by}; candidates:")
    print(f"{'run':>34} {'val ' + args.select_by:>12} {'test ppl':>10} {'test KL':>9} {'codes/step':>10} {'time':>6}")
    for row in candidates["p_only"] + candidates["pv"]:
        print(f"{row['name']:>34} {row['validation']:12.5f} {row['perplexity']:10.4f} {row['kl']:9.5f} "
              f"{100 * row['mean_codes_changed']:9.3f}% {row['seconds']:5.0f}s")
    print(f"\n{'':>10} {'perplexity':>11} {'KL(dense||q)':>13}   run")
    for name, label in (("dense", "dense"), ("before", "quantized"), ("p_only", "P-only"), ("pv", "PV")):
        row = results[name]
        print(f"{label:>10} {row['perplexity']:11.4f} {row['kl']:13.5f}   {row.get('name', '')}")
    verdict = "PV beats P-only" if results["pv"]["kl"] < results["p_only"]["kl"] else "PV does NOT beat P-only"
    print(f"{verdict} on test KL ({results['pv']['kl']:.5f} vs {results['p_only']['kl']:.5f}) and perplexity "
          f"({results['pv']['perplexity']:.4f} vs {results['p_only']['perplexity']:.4f}); "
          f"total {time.perf_counter() - started:.0f} s")
    summary = {"args": vars(args), "results": results, "candidates": candidates}
    (work / "ablation.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
