"""Settings of a PV-Tuning run."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

SELECT_BY = ("perplexity", "kl")
SAVE_DTYPES = ("auto", "float16", "bfloat16", "float32")


# The settings of the V step alone: they change nothing when update_codes is False.
V_STEP_SETTINGS = ("code_lr", "code_beta1", "code_beta2", "delta_decay", "max_code_change_per_step",
                   "code_trust_ratio", "code_selection_temperature", "beam_size")


@dataclass
class PVConfig:
    """Everything that determines the result of :func:`aqlm.pv_tuning.pv_tune`.

    The defaults follow the PV-Tuning recipe of upstream AQLM's README (LAMB with debiasing,
    ``lr=3e-4``, betas ``(0.9, 0.95)``, ``code_lr=1e-2``, code betas ``(0, 0.95)``,
    ``delta_decay=0``, ``max_code_change_per_step=1e-2``), scaled down to CPU-sized runs.

    Data:
        nsamples: calibration windows: drawn at random positions of a token stream, or the first
            ``seqlen`` tokens of randomly ordered rows of 2-D token data (independent sequences).
        seqlen: tokens per window (capped at the model's maximum context).
        eval_windows: at most this many held-out windows for periodic evaluation.
        val_fraction: when no separate evaluation data is given, this tail fraction of the tokens
            (of the rows, for 2-D data) is held out for evaluation and the windows come from the rest.

    Schedule:
        num_steps: optimizer steps.
        batch_size: windows per optimizer step (the loss is the mean over all their tokens); under
            ``torchrun`` the processes share them equally (see :mod:`aqlm.pv_tuning.train`).
        microbatch_size: windows per forward/backward pass; gradients are accumulated.

    What is trained:
        update_codes: the V step (discrete codes). False gives P-only tuning.
        update_codebooks_and_scales: the P step (codebooks and scales of every quantized layer).
        update_non_quantized_parameters: every other float parameter of the student (norms,
            embeddings, output head, biases), with the P step's optimizer settings (as upstream).

    Continuous optimizer (P step and non-quantized parameters):
        lr, beta1, beta2, eps, weight_decay: Adam/LAMB hyperparameters.
        lamb: LAMB (Adam update rescaled per tensor to ``||param|| / ||update||``); False is Adam.
        amsgrad: keep the running maximum of the second moment.
        debias: bias-correct the moments; None means True for Adam and False for LAMB.

    Discrete optimizer (V step):
        code_lr, code_beta1, code_beta2: the same optimizer applied to the de-quantized weights
            (``delta_decay == 1``) or to the straight-through buffers (``delta_decay < 1``).
        delta_decay: 1 = direct V step; 0 = straight-through; in between = penalized
            straight-through (see :class:`aqlm.pv_tuning.PVOptimizer`).
        max_code_change_per_step: at most this fraction of code groups per layer is re-encoded per step.
        code_trust_ratio: optional bound on ``||What_new - What_old|| / ||What_old||`` per step.
        code_selection_temperature: 0 re-encodes the groups with the largest change; > 0 samples them.
        beam_size: beam width of the re-encoding search.

    Numerics:
        gradient_checkpointing: recompute each transformer block in the backward pass.
        bf16: run the forward passes of student and teacher under CPU bfloat16 autocast (the
            loss, master weights and optimizer states stay float32).

    Evaluation and checkpoints:
        eval_every: evaluate every this many steps (0: only before and after training).
        select_by: metric for keep-best, "perplexity" (of the student on the held-out windows)
            or "kl" (to the teacher on the same windows).
        keep_best: save the best evaluated state (the starting point included) instead of the last.
        save_every: write a resumable checkpoint every this many steps (0: never).
        eval_batch_size: windows per evaluation forward pass.

    Other:
        seed: calibration windows, their order and sampled code selection derive from it.
        save_dtype: dtype of the saved codebooks, scales and biases; "auto" keeps the student's.
        num_threads: threads of the C re-encoder (None: ``torch.get_num_threads()``); does not
            change the result.
        shard_optimizer_state: under ``torchrun``, each process keeps the optimizer moments of
            only its share of the trained tensors (PyTorch's ``ZeroRedundancyOptimizer``, ZeRO
            stage 1) and sends the tensors it updated to the others; does not change the result.
            The largest moments are those of the V step's targets, two per de-quantized weight.
        fsdp: under ``torchrun``, shard the decoder blocks of the teacher and the student by rows
            with PyTorch's FSDP2 (:mod:`aqlm.pv_tuning.sharding`): each process holds its rows of
            the de-quantized weights, their gradients, buffers and moments, and of the teacher's
            weights. Equal to one process's run up to float rounding (the codebooks' gradient is
            summed in another order); not with ``shard_optimizer_state``.
    """

    nsamples: int = 256
    seqlen: int = 512
    eval_windows: int = 16
    val_fraction: float = 0.1

    num_steps: int = 100
    batch_size: int = 8
    microbatch_size: int = 1

    update_codes: bool = True
    update_codebooks_and_scales: bool = True
    update_non_quantized_parameters: bool = False

    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-6
    weight_decay: float = 0.0
    lamb: bool = True
    amsgrad: bool = False
    debias: Optional[bool] = True

    code_lr: float = 1e-2
    code_beta1: float = 0.0
    code_beta2: float = 0.95
    delta_decay: float = 0.0
    max_code_change_per_step: float = 1e-2
    code_trust_ratio: Optional[float] = None
    code_selection_temperature: float = 0.0
    beam_size: int = 1

    gradient_checkpointing: bool = False
    bf16: bool = False

    eval_every: int = 10
    select_by: str = "perplexity"
    keep_best: bool = True
    save_every: int = 10
    eval_batch_size: int = 4

    seed: int = 0
    save_dtype: str = "auto"
    num_threads: Optional[int] = None
    shard_optimizer_state: bool = False
    fsdp: bool = False

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

        def non_negative_int(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")

        for name in ("nsamples", "eval_windows", "num_steps", "batch_size", "microbatch_size", "beam_size",
                     "eval_batch_size"):
            positive_int(name)
        for name in ("eval_every", "save_every"):
            non_negative_int(name)
        if not isinstance(self.seqlen, int) or self.seqlen < 2:
            raise ValueError(f"seqlen must be an integer >= 2, got {self.seqlen!r}")
        if self.microbatch_size > self.batch_size:
            raise ValueError(f"microbatch_size ({self.microbatch_size}) cannot exceed batch_size ({self.batch_size})")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not (self.update_codes or self.update_codebooks_and_scales or self.update_non_quantized_parameters):
            raise ValueError(
                "nothing to train: set at least one of update_codes, update_codebooks_and_scales "
                "and update_non_quantized_parameters"
            )
        for name in ("lr", "code_lr", "eps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        for name in ("beta1", "beta2", "code_beta1", "code_beta2"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not 0 <= self.delta_decay <= 1:
            raise ValueError(f"delta_decay must be in [0, 1], got {self.delta_decay}")
        if not 0 < self.max_code_change_per_step <= 1:
            raise ValueError(f"max_code_change_per_step must be in (0, 1], got {self.max_code_change_per_step}")
        if self.code_trust_ratio is not None and not self.code_trust_ratio > 0:
            raise ValueError(f"code_trust_ratio must be positive or None, got {self.code_trust_ratio}")
        if self.code_selection_temperature < 0:
            raise ValueError(f"code_selection_temperature must be >= 0, got {self.code_selection_temperature}")
        if self.select_by not in SELECT_BY:
            raise ValueError(f"select_by must be one of {SELECT_BY}, got {self.select_by!r}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {SAVE_DTYPES}, got {self.save_dtype!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"num_threads must be a positive integer or None, got {self.num_threads!r}")
        if self.fsdp and self.shard_optimizer_state:
            raise ValueError("fsdp already shards the largest optimizer moments (those of the de-quantized weights) "
                             "with the weights: use fsdp or shard_optimizer_state, not both")

    @property
    def straight_through(self) -> bool:
        """Whether the V step keeps straight-through buffers (``delta_decay < 1``)."""
        return self.update_codes and self.delta_decay < 1

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> dict:
        """The settings that change the result (for checking that a resumed run is the same job).

        Without the V step (``update_codes=False``) its settings change nothing and are left out.
        """
        data = self.to_dict()
        data.pop("num_threads")
        data.pop("shard_optimizer_state")
        data.pop("fsdp")
        if not self.update_codes:
            for name in V_STEP_SETTINGS:
                data.pop(name)
        return data
