"""``python -m aqlm finetune``: PV-Tuning of an AQLM checkpoint from the command line.

Example::

    python -m aqlm finetune --base DENSE_DIR --quantized AQLM_DIR --dataset calib.txt --out OUT_DIR \\
        --steps 200 --batch-size 8 --seqlen 512 --eval-dataset test.txt

Data-parallel over several processes: ``--nproc N`` (one machine), or ``torchrun`` for several
machines (see :mod:`aqlm.pv_tuning.train`)::

    python -m aqlm finetune --nproc 4 --threads 4 ...
    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 -m aqlm finetune ...

Wire it in with ``add_arguments(subparsers.add_parser("finetune", ...))`` and ``run(args)``;
``--nproc`` re-runs the command line that ``aqlm.cli.main`` keeps in ``args.command_line``.
"""
from __future__ import annotations

import argparse
import sys

from ..argtypes import int_at_least
from ..launch import check_nproc, launch_workers
from .config import SAVE_DTYPES, SELECT_BY, PVConfig

_DEFAULTS = PVConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``finetune`` options to ``parser``."""
    io = parser.add_argument_group("models and data")
    io.add_argument("--base", required=True, help="dense Hugging Face model directory (the teacher)")
    io.add_argument("--quantized", required=True, help="AQLM checkpoint directory to tune (the student)")
    io.add_argument("--dataset", required=True, help="calibration data: .txt/.jsonl text or a .pt token tensor")
    io.add_argument("--out", required=True, help="output directory for the tuned AQLM checkpoint")
    io.add_argument("--eval-dataset",
                    help="held-out data for evaluation and keep-best (default: the tail of --dataset)")
    io.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    io.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --out (an earlier run's checkpoint and report there are discarded)")

    data = parser.add_argument_group("calibration windows and schedule")
    data.add_argument("--nsamples", type=int, default=_DEFAULTS.nsamples, help="calibration windows")
    data.add_argument("--seqlen", type=int, default=_DEFAULTS.seqlen, help="tokens per window")
    data.add_argument("--eval-windows", type=int, default=_DEFAULTS.eval_windows, help="held-out windows to evaluate")
    data.add_argument("--val-fraction", type=float, default=_DEFAULTS.val_fraction,
                      help="tail of --dataset held out when no --eval-dataset is given")
    data.add_argument("--steps", type=int, default=_DEFAULTS.num_steps, help="optimizer steps")
    data.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="windows per optimizer step")
    data.add_argument("--microbatch-size", type=int, default=_DEFAULTS.microbatch_size,
                      help="windows per forward/backward pass (gradients are accumulated)")

    train = parser.add_argument_group("what to train")
    train.add_argument("--no-update-codes", dest="update_codes", action="store_false",
                       help="freeze the codes (P-only tuning)")
    train.add_argument("--no-update-codebooks-and-scales", dest="update_codebooks_and_scales", action="store_false",
                       help="freeze codebooks and scales")
    train.add_argument("--update-non-quantized-parameters", action="store_true",
                       help="also train norms, embeddings, output head and biases")

    p_step = parser.add_argument_group("continuous optimizer (P step)")
    p_step.add_argument("--lr", type=float, default=_DEFAULTS.lr)
    p_step.add_argument("--beta1", type=float, default=_DEFAULTS.beta1)
    p_step.add_argument("--beta2", type=float, default=_DEFAULTS.beta2)
    p_step.add_argument("--weight-decay", type=float, default=_DEFAULTS.weight_decay)
    p_step.add_argument("--adam", dest="lamb", action="store_false", help="Adam instead of LAMB")
    p_step.add_argument("--amsgrad", action="store_true")
    p_step.add_argument("--no-debias", dest="debias", action="store_false", help="no bias correction of the moments")

    v_step = parser.add_argument_group("discrete optimizer (V step)")
    v_step.add_argument("--code-lr", type=float, default=_DEFAULTS.code_lr)
    v_step.add_argument("--code-beta1", type=float, default=_DEFAULTS.code_beta1)
    v_step.add_argument("--code-beta2", type=float, default=_DEFAULTS.code_beta2)
    v_step.add_argument("--delta-decay", type=float, default=_DEFAULTS.delta_decay,
                        help="1: direct V step; 0: straight-through; in between: penalized straight-through")
    v_step.add_argument("--max-code-change-per-step", type=float, default=_DEFAULTS.max_code_change_per_step,
                        help="fraction of code groups per layer that may change per step")
    v_step.add_argument("--code-trust-ratio", type=float, default=None,
                        help="bound on ||W_new - W_old|| / ||W_old|| of the quantized weights per step")
    v_step.add_argument("--code-selection-temperature", type=float, default=_DEFAULTS.code_selection_temperature,
                        help="0: re-encode the groups that moved most; > 0: sample them")
    v_step.add_argument("--beam-size", type=int, default=_DEFAULTS.beam_size)

    other = parser.add_argument_group("numerics, evaluation, checkpoints")
    other.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in the backward pass")
    other.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes")
    other.add_argument("--eval-every", type=int, default=_DEFAULTS.eval_every, help="0: only before and after")
    other.add_argument("--eval-batch-size", type=int, default=_DEFAULTS.eval_batch_size)
    other.add_argument("--select-by", choices=SELECT_BY, default=_DEFAULTS.select_by, help="keep-best metric")
    other.add_argument("--no-keep-best", dest="keep_best", action="store_false", help="save the last state")
    other.add_argument("--save-every", type=int, default=_DEFAULTS.save_every, help="checkpoint interval (0: never)")
    other.add_argument("--save-dtype", choices=SAVE_DTYPES, default=_DEFAULTS.save_dtype)
    other.add_argument("--seed", type=int, default=_DEFAULTS.seed)
    other.add_argument("--threads", type=int_at_least(1), default=None, help="torch and C threads (default: torch's)")
    other.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    other.add_argument("--shard-optimizer-state", action="store_true",
                       help="with several processes, each keeps the optimizer moments of its share of the tensors only "
                            "(ZeRO stage 1; same result, less memory per process)")
    other.add_argument("--fsdp", action="store_true",
                       help="with several processes, shard the decoder blocks of both models with PyTorch's FSDP2: "
                            "each process holds its rows of the weights, gradients and moments (for models that do "
                            "not fit one process; the result of one process, to float rounding)")
    other.add_argument("--nproc", type=int_at_least(1), default=None,
                       help="data-parallel over this many local processes (torch.distributed.run --standalone); "
                            "--batch-size must be a multiple of nproc x --microbatch-size")


def config_from_args(args: argparse.Namespace) -> PVConfig:
    """The :class:`PVConfig` described by parsed ``finetune`` arguments."""
    return PVConfig(
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        eval_windows=args.eval_windows,
        val_fraction=args.val_fraction,
        num_steps=args.steps,
        batch_size=args.batch_size,
        microbatch_size=args.microbatch_size,
        update_codes=args.update_codes,
        update_codebooks_and_scales=args.update_codebooks_and_scales,
        update_non_quantized_parameters=args.update_non_quantized_parameters,
        lr=args.lr,
        beta1=args.beta1,
        beta2=args.beta2,
        weight_decay=args.weight_decay,
        lamb=args.lamb,
        amsgrad=args.amsgrad,
        debias=args.debias,
        code_lr=args.code_lr,
        code_beta1=args.code_beta1,
        code_beta2=args.code_beta2,
        delta_decay=args.delta_decay,
        max_code_change_per_step=args.max_code_change_per_step,
        code_trust_ratio=args.code_trust_ratio,
        code_selection_temperature=args.code_selection_temperature,
        beam_size=args.beam_size,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        eval_every=args.eval_every,
        eval_batch_size=args.eval_batch_size,
        select_by=args.select_by,
        keep_best=args.keep_best,
        save_every=args.save_every,
        save_dtype=args.save_dtype,
        seed=args.seed,
        num_threads=args.threads,
        shard_optimizer_state=args.shard_optimizer_state,
        fsdp=args.fsdp,
    )


def launch(args: argparse.Namespace, nproc: int) -> int:
    """Run this ``finetune`` command in ``nproc`` processes with ``torch.distributed.run --standalone``.

    Returns 0, or 1 after a one-line message when a process failed.

    Raises:
        ValueError: without the command line, or a batch that does not split into the processes.
    """
    from ..hf import check_model_kind
    from .train import check_batch_split

    argv = getattr(args, "command_line", None)
    if argv is None:
        raise ValueError("--nproc re-runs the command line: use it with `python -m aqlm finetune`")
    config = config_from_args(args)
    check_batch_split(config.batch_size, config.microbatch_size, nproc)
    check_model_kind(args.base, "dense", "dense model")
    check_model_kind(args.quantized, "aqlm", "quantized model")
    return launch_workers(nproc, argv)


def run(args: argparse.Namespace) -> int:
    """Run ``finetune``; returns the exit status (1 when training diverged).

    With ``--nproc`` above 1 it launches the processes (:func:`launch`); under ``torchrun`` each process
    joins the process group and trains its share. Bad input raises FileNotFoundError,
    FileExistsError or ValueError with a message naming the problem.
    """
    import os

    import torch

    from ..distributed import process_group
    from .train import pv_tune

    nproc = check_nproc(args.nproc, os.environ)
    if nproc > 1:
        return launch(args, nproc)
    config = config_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    with process_group(torch.device("cpu")) as world:
        main = world.is_main
        try:
            report = pv_tune(
                args.base,
                args.quantized,
                args.dataset,
                args.out,
                config,
                eval_dataset=args.eval_dataset,
                resume=args.resume,
                overwrite=args.overwrite,
                progress=args.progress,
            )
        except FloatingPointError as error:
            if main:
                print(f"error: {error}", file=sys.stderr)
            return 1
    if main:
        print(report.summary())
        print(f"checkpoint: {report.out_dir}")
    return 0
