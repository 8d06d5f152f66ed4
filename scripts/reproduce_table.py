"""One command per table: dense, RTN, GPTQ, AQLM (1x16, 2x8, 1x8) and AQLM+PV on one model, same data.

Every row is computed by this package's own code on the same calibration windows (WikiText-2
valid.txt) and evaluated with the same protocol (WikiText-2 test.txt, non-overlapping windows):
scheme, bits per weight of the quantized layers (codes/grids + codebooks/scales/zeros, 16-bit
parameters), size of the whole model on disk, perplexity and quantization wall time. Each row is
saved under OUT/rows/ as soon as it is done, so an interrupted run continues where it stopped;
the Markdown table (OUT/results.md) and the plot (OUT/perplexity_vs_bits.png) are rewritten after
every row.

    python scripts/reproduce_table.py --model smollm2-135m --out results/smollm2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from aqlm.baselines import quantize_model_gptq, quantize_model_rtn, rtn_bits_per_weight
from aqlm.calibration import find_linears, get_blocks
from aqlm.cli import _resolve_model, evaluate_model, load_model
from aqlm.data import calibration_windows, load_tokens
from aqlm.format import AqlmScheme
from aqlm.paths import data_dir
from aqlm.quantize import FinetuneConfig, LayerConfig, QuantizeConfig, quantize_model

ROWS = ["fp", "rtn-4", "rtn-3", "rtn-2", "gptq-4", "gptq-3", "gptq-2", "aqlm-1x16g8", "aqlm-2x8g8", "aqlm-1x8g8", "aqlm-2x8g8+pv"]


def _linear_parameters(model) -> int:
    return sum(linear.weight.numel() for block in get_blocks(model) for linear in find_linears(block).values())


def _dense_bits(model) -> int:
    return sum(p.numel() * 16 for p in model.parameters())


def _aqlm_size_mib(model, bits: float) -> float:
    """Model size as the grid rows count it: quantized layers at ``bits`` per weight, other parameters at 16."""
    from aqlm import QuantizedLinear

    quantized = [module for module in model.modules() if isinstance(module, QuantizedLinear)]
    inside = {id(p) for module in quantized for p in module.parameters()}
    weights = sum(module.in_features * module.out_features for module in quantized)
    other = sum(p.numel() for p in model.parameters() if id(p) not in inside)
    return (weights * bits + other * 16) / 8 / 2**20


def _grid_row(model, kind: str, bits: int, args, windows) -> dict:
    """RTN or GPTQ with groups of args.group_size: fake-quantized in place; size as if packed."""
    started = time.perf_counter()
    if kind == "rtn":
        quantize_model_rtn(model, bits, args.group_size)
    else:
        quantize_model_gptq(model, windows, bits, args.group_size, progress=True)
    seconds = time.perf_counter() - started
    per_weight = rtn_bits_per_weight(bits, args.group_size)
    quantized = _linear_parameters(model)
    other = sum(p.numel() for p in model.parameters()) - quantized
    return {"bits": per_weight, "size_mib": (quantized * per_weight + other * 16) / 8 / 2**20, "seconds": seconds}


def _aqlm_row(model_dir: Path, scheme: str, args, work: Path) -> tuple[Path, dict]:
    layer = LayerConfig(
        scheme=AqlmScheme.parse(scheme), max_epochs=args.max_epochs, steps_per_epoch=args.steps_per_epoch,
        codebook_update="lstsq", init_max_iter=args.init_max_iter,
        init_max_points_per_centroid=args.init_max_points_per_centroid,
    )
    config = QuantizeConfig(layer=layer, finetune=FinetuneConfig(max_epochs=args.finetune_epochs, lr=1e-4),
                            nsamples=args.nsamples, seqlen=args.calib_seqlen)
    out = work / f"aqlm-{scheme}"
    started = time.perf_counter()
    report = quantize_model(model_dir, args.calibration, out, config, resume=(out / "aqlm_progress").exists())
    return out, {"bits": report.bits_per_weight, "seconds": time.perf_counter() - started}


def _pv_row(model_dir: Path, quantized: Path, args, work: Path) -> tuple[Path, dict]:
    from aqlm.pv_tuning import PVConfig, pv_tune

    out = work / (quantized.name + "+pv")
    started = time.perf_counter()
    pv_tune(model_dir, quantized, args.calibration, out, PVConfig(**json.loads(args.pv_config)),
            resume=(out / "pv_checkpoint").exists())
    report = json.loads((quantized / "quantization_report.json").read_text())
    return out, {"bits": report["bits_per_weight"], "seconds": time.perf_counter() - started}


def _existing_row(path: Path, base_bits: Optional[float] = None) -> dict:
    """A row for a checkpoint made earlier: bits and time from its own report, ``quantization_report.json`` of
    ``python -m aqlm quantize`` or, for a ``+pv`` row, ``pv_report.json`` of ``python -m aqlm finetune``
    (its bits are its base's, ``base_bits``: PV-Tuning keeps the scheme)."""
    report_name = "quantization_report.json" if base_bits is None else "pv_report.json"
    report_file = path / report_name
    if not report_file.is_file():
        raise FileNotFoundError(f"{path} has no {report_name}: not a checkpoint of that kind made by this package")
    report = json.loads(report_file.read_text())
    bits = report["bits_per_weight"] if base_bits is None else base_bits
    return {"bits": bits, "seconds": report["seconds"], "checkpoint": str(path)}


def write_outputs(out: Path, rows: dict, args) -> None:
    """results.md and perplexity_vs_bits.png from the finished rows."""
    lines = [
        f"Model `{args.model}`; perplexity on WikiText-2 test.txt (word-level tokenized release), first "
        f"{args.eval_windows or 'all'} non-overlapping windows of {args.eval_seqlen} tokens; calibration "
        f"{args.nsamples} windows of {args.calib_seqlen} tokens from valid.txt. Bits per weight of the "
        "quantized linear layers, parameters (codebooks, scales, zero points) counted at 16 bits; size: the "
        "quantized layers at that many bits, all other parameters at 16 bits.",
        "",
        "| scheme | bits/weight | size (MiB) | perplexity | quantization time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in ROWS:
        if name in rows:
            row = rows[name]
            lines.append(f"| {name} | {row['bits']:.2f} | {row['size_mib']:.1f} | {row['perplexity']:.2f} | {row['seconds']:.0f} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for family, marker in (("rtn", "s"), ("gptq", "^"), ("aqlm", "o")):
        points = sorted((r["bits"], r["perplexity"], n) for n, r in rows.items() if n.startswith(family))
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=family.upper())
            for bits, ppl, name in points:
                axis.annotate(name.split("-", 1)[1], (bits, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if "fp" in rows:
        axis.axhline(rows["fp"]["perplexity"], color="gray", linestyle="--", label="dense")
    axis.set_xlabel("bits per weight (quantized layers)")
    axis.set_ylabel("WikiText-2 perplexity")
    axis.set_yscale("log")
    axis.set_title(args.model)
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "perplexity_vs_bits.png", dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="bundled model name or dense model directory")
    parser.add_argument("--out", default="results/smollm2-135m")
    parser.add_argument("--rows", nargs="+", default=ROWS, choices=ROWS)
    parser.add_argument("--calibration", default=str(data_dir() / "wikitext-2" / "valid.txt"))
    parser.add_argument("--test", default=str(data_dir() / "wikitext-2" / "test.txt"))
    parser.add_argument("--nsamples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--eval-seqlen", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64, help="0 = the whole test set")
    parser.add_argument("--group-size", type=int, default=128, help="RTN/GPTQ group size")
    parser.add_argument("--max-epochs", type=int, default=8)
    parser.add_argument("--steps-per-epoch", type=int, default=20)
    parser.add_argument("--init-max-iter", type=int, default=25)
    parser.add_argument("--init-max-points-per-centroid", type=int, default=None)
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--pv-config", default="{}", help="JSON of aqlm.pv_tuning.PVConfig fields for the +pv row")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--existing", nargs="+", default=[], metavar="ROW=DIR",
                        help="take an AQLM row from a checkpoint made earlier, e.g. aqlm-2x8g8=out/smollm2-2x8g8 "
                        "(a +pv row: the output of `python -m aqlm finetune`; its base row must be done first)")
    args = parser.parse_args()
    existing = {}
    for item in args.existing:
        name, _, directory = item.partition("=")
        if name not in ROWS or not name.startswith("aqlm") or not directory:
            parser.error(f"--existing {item!r}: expected ROW=DIR with ROW one of the aqlm rows")
        existing[name] = Path(directory)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    model_dir = _resolve_model(args.model)
    eval_windows = args.eval_windows or None
    rows = {}
    for path in (out / "rows").glob("*.json"):
        rows[path.stem] = json.loads(path.read_text())
    windows = None
    for name in args.rows:
        if name in rows:
            print(f"{name}: done earlier ({rows[name]['perplexity']:.2f})")
            continue
        print(f"== {name}", flush=True)
        if name == "fp":
            model, tokenizer = load_model(model_dir)
            row = {"bits": 16.0, "size_mib": _dense_bits(model) / 8 / 2**20, "seconds": 0.0}
        elif name.startswith(("rtn", "gptq")):
            kind, bits = name.split("-")
            model, tokenizer = load_model(model_dir)
            if kind == "gptq" and windows is None:
                windows = calibration_windows(load_tokens(args.calibration, tokenizer), args.nsamples, args.calib_seqlen, 0)
            row = _grid_row(model, kind, int(bits), args, windows)
        elif name.endswith("+pv") and name in existing:
            if name[: -len("+pv")] not in rows:
                print(f"{name}: needs the {name[: -len('+pv')]} row first; skipped")
                continue
            path, row = existing[name], _existing_row(existing[name], rows[name[: -len("+pv")]]["bits"])
        elif name.endswith("+pv"):
            base = existing.get(name[: -len("+pv")], out / "checkpoints" / name[: -len("+pv")])
            if not (base / "config.json").exists():
                print(f"{name}: needs the {name[: -len('+pv')]} row first; skipped")
                continue
            path, row = _pv_row(model_dir, base, args, out / "checkpoints")
        elif name in existing:
            path, row = existing[name], _existing_row(existing[name])
        else:
            path, row = _aqlm_row(model_dir, name.split("-", 1)[1], args, out / "checkpoints")
        if name.startswith("aqlm"):
            model, tokenizer = load_model(path)
            row["size_mib"] = _aqlm_size_mib(model, row["bits"])
            row["file_mib"] = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        row["perplexity"] = evaluate_model(model, tokenizer, args.test, args.eval_seqlen, eval_windows)["perplexity"]
        rows[name] = row
        (out / "rows" / f"{name}.json").write_text(json.dumps(row, indent=2))
        write_outputs(out, rows, args)
        print(f"{name}: {row}", flush=True)
        del model
    write_outputs(out, rows, args)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
