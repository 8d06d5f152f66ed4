"""The PV-Tuning training loop: distil a dense teacher into its AQLM-quantized student.

:func:`pv_tune` loads both models, draws calibration windows, trains the student with
:class:`~aqlm.pv_tuning.optim.PVOptimizer` on the KL divergence to the teacher
(:mod:`aqlm.pv_tuning.loss`), evaluates it periodically on held-out windows, keeps the best
state, writes resumable checkpoints, and saves the result as a Hugging Face AQLM checkpoint.

Data-parallel over ``torch.distributed`` processes (``torchrun``, ``--nproc``): every process holds
the whole teacher and student and the same calibration windows and step schedule. A step's global
batch of ``batch_size`` windows is cut into one contiguous share per process; each runs
forward/backward on its share, scaling its loss by the number of tokens of the *global* batch, so
the sum of the processes' gradients (:meth:`aqlm.distributed.World.sum_gradients`) is the gradient of
the single-process loss. Every process then holds the same gradients, bit for bit (a collective's
result is the same on every rank), and runs the same deterministic P step (Adam/LAMB) and V step
(re-encoding with the same seeded generator) on the same state, so codes, codebooks and scales stay
identical without being sent around; an exact digest checks that after every step. Evaluation
windows are split across the processes and their sums all-reduced. Only rank 0 writes files;
decisions that depend on files are made on rank 0 and broadcast, so processes on other machines
need no shared file system for them. The trainer runs on the CPU (the V step's beam search is C
code on CPU tensors), so the process group uses gloo. With ``shard_optimizer_state`` the Adam/LAMB
moments are split between the processes instead (ZeRO stage 1): each updates its share of the
tensors and broadcasts them, and the shares are gathered on rank 0 for every checkpoint. With
``fsdp`` the decoder blocks of both models are sharded by rows with PyTorch's FSDP2 instead of
being whole on every process (:mod:`aqlm.pv_tuning.sharding`): the de-quantized weights, their
gradients, buffers and moments, and the teacher's weights, which do not then need to fit one process.
Its checkpoints stay sharded too (:func:`_save_checkpoint`, written by every process; across
machines that needs a shared file system).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..data import Dataset, prepare_windows
from ..distributed import World
from ..fileio import atomic_save, atomic_write_text, check_output_dir, file_sha256, model_identity, tokens_sha256
from ..hf import check_model_kind, load_causal_lm, save_quantized
from ..inference import QuantizedLinear
from .config import PVConfig
from .loss import (
    Evaluation,
    autocast_context,
    distillation_loss_sum,
    evaluation_from_sums,
    evaluation_sums,
    hidden_states,
    split_decoder_and_head,
)
from .optim import PVOptimizer, QuantizedEntry, join_sharded_state
from .sharding import assign, is_sharded, local, local_bytes, shard_decoders, whole

CHECKPOINT_DIR = "pv_checkpoint"
CHECKPOINT_FILE = "state.pt"
SHARDED_TENSORS_PREFIX = "tensors-"
REPORT_FILE = "pv_report.json"
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
_MATCHING_CONFIG_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads",
)

@dataclass
class PVReport:
    """The outcome of :func:`pv_tune` (also written to ``out_dir/pv_report.json``).

    ``steps`` has one record per optimizer step (``step``, ``loss`` = mean KL to the teacher on
    the step's batch, ``codes_changed`` = fraction of code groups changed by the V step);
    ``evaluations`` one per evaluation (``step``, held-out ``perplexity`` and ``kl``), step 0
    being the student before training; ``final`` is the evaluation of the saved checkpoint (the
    best evaluated state with ``keep_best``, its parameters cast to the saved dtype); ``seconds``
    is the wall time of the call that finished the run, ``total_seconds`` that of the whole run over
    its resumed calls (up to the last checkpoint of each interrupted call).
    """

    out_dir: Path
    config: dict
    steps: list[dict]
    evaluations: list[dict]
    best_step: int
    final: dict
    seconds: float
    total_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def initial(self) -> dict:
        """The evaluation before training (step 0)."""
        return self.evaluations[0]

    def summary(self) -> str:
        """One human-readable line."""
        mode = "PV" if self.config["update_codes"] else "P-only"
        changed = [s["codes_changed"] for s in self.steps]
        mean_changed = sum(changed) / len(changed) if changed else 0.0
        return (
            f"{mode} tuning, {len(self.steps)} steps: held-out perplexity {self.initial['perplexity']:.4f} -> "
            f"{self.final['perplexity']:.4f}, KL to teacher {self.initial['kl']:.5f} -> {self.final['kl']:.5f} "
            f"(saved step {self.best_step}; mean codes changed per step {100 * mean_changed:.3f}%); "
            f"{self.seconds:.0f} s"
        )

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return {
            "summary": self.summary(),
            "out_dir": str(self.out_dir),
            "config": self.config,
            "steps": self.steps,
            "evaluations": self.evaluations,
            "best_step": self.best_step,
            "final": self.final,
            "seconds": self.seconds,
            "total_seconds": self.total_seconds,
            **self.extra,
        }


def _dataset_identity(dataset: Optional[Dataset]) -> Optional[dict]:
    if dataset is None:
        return None
    if isinstance(dataset, torch.Tensor):
        return {"tokens_sha256": tokens_sha256(dataset)}
    return {"name": Path(dataset).name, "sha256": file_sha256(Path(dataset))}


def _stored_codebook_dtype(quantized_dir: Path) -> torch.dtype:
    from safetensors import safe_open

    for path in sorted(quantized_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".codebooks"):
                    stored = handle.get_slice(key).get_dtype()
                    if stored in _SAFETENSORS_DTYPES:
                        return _SAFETENSORS_DTYPES[stored]
    return torch.float16


def load_student(quantized_dir: Union[str, os.PathLike]) -> nn.Module:
    """Load an AQLM checkpoint with float32 codebooks, scales and other parameters.

    Raises:
        FileNotFoundError: the directory or its config.json is missing.
        ValueError: it is not an AQLM checkpoint, or holds no ``QuantizedLinear`` layer.
    """
    return load_causal_lm(quantized_dir, kind="aqlm", dtype=torch.float32, role="quantized model")[0]


def check_compatible(teacher: nn.Module, student: nn.Module) -> None:
    """Raise ValueError unless the student is a quantization of the teacher's architecture."""
    differences = []
    for key in _MATCHING_CONFIG_KEYS:
        a, b = getattr(teacher.config, key, None), getattr(student.config, key, None)
        if a != b:
            differences.append(f"{key}: teacher {a!r}, student {b!r}")
    if differences:
        raise ValueError("the dense and quantized models do not match: " + "; ".join(differences))
    teacher_modules = dict(teacher.named_modules())
    for name, module in student.named_modules():
        if isinstance(module, QuantizedLinear):
            dense = teacher_modules.get(name)
            if not isinstance(dense, nn.Linear):
                raise ValueError(
                    f"the student's quantized layer {name} has no dense nn.Linear counterpart in the teacher"
                )
            if (dense.out_features, dense.in_features) != (module.out_features, module.in_features):
                raise ValueError(
                    f"{name}: teacher shape {(dense.out_features, dense.in_features)}, "
                    f"student shape {(module.out_features, module.in_features)}"
                )


def dequantized_student(
    student: nn.Module, on_meta: bool = False
) -> tuple[list[QuantizedEntry], dict[str, nn.Parameter]]:
    """Replace every ``QuantizedLinear`` of ``student`` by an ``nn.Linear`` holding its de-quantized weight.

    Returns the entries (each with the removed ``QuantizedLinear`` as master copy; the bias
    parameter is shared) and the student's other float parameters by name. With ``on_meta`` the
    weights are left on the meta device, without values (for FSDP, which then allocates each
    process's rows, :func:`aqlm.pv_tuning.sharding.shard_decoders`; :class:`PVOptimizer` fills them).
    """
    entries = []
    for name, module in list(student.named_modules()):
        if not isinstance(module, QuantizedLinear):
            continue
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
        if on_meta:
            linear.weight = nn.Parameter(torch.empty(module.out_features, module.in_features, device="meta"))
        else:
            linear.weight = nn.Parameter(module.dequantize().detach().float().clone())
        if module.bias is not None:
            linear.bias = module.bias
        student.set_submodule(name, linear)
        entries.append(QuantizedEntry(name=name, linear=linear, quantized=module))
    if not entries:
        raise ValueError("the student has no aqlm.QuantizedLinear layers")
    dense_ids = {id(entry.linear.weight) for entry in entries}
    non_quantized = {
        name: p for name, p in student.named_parameters() if id(p) not in dense_ids and p.is_floating_point()
    }
    return entries, non_quantized


def restore_quantized(student: nn.Module, entries: list[QuantizedEntry], dtype: torch.dtype) -> None:
    """Put the (trained) ``QuantizedLinear`` layers back into ``student``, with float parameters in ``dtype``."""
    for entry in entries:
        q = entry.quantized
        for name in ("codebooks", "scales", "bias"):
            parameter = getattr(q, name)
            if parameter is not None:
                setattr(q, name, nn.Parameter(parameter.detach().to(dtype).contiguous(), requires_grad=False))
        q.codes = nn.Parameter(q.codes.detach().contiguous(), requires_grad=False)
        student.set_submodule(entry.name, q)


def _snapshot(entries: list[QuantizedEntry], non_quantized: dict[str, nn.Parameter]) -> dict:
    return {
        "quantized": {
            e.name: {
                "codes": e.quantized.codes.detach().clone(),
                "codebooks": e.quantized.codebooks.detach().clone(),
                "scales": e.quantized.scales.detach().clone(),
            }
            for e in entries
        },
        "non_quantized": {name: whole(p.detach()).clone() for name, p in non_quantized.items()},
    }


@torch.no_grad()
def _restore_snapshot(snapshot: dict, entries: list[QuantizedEntry], non_quantized: dict[str, nn.Parameter]) -> None:
    for e in entries:
        saved = snapshot["quantized"][e.name]
        e.quantized.codes.copy_(saved["codes"])
        e.quantized.codebooks.copy_(saved["codebooks"])
        e.quantized.scales.copy_(saved["scales"])
        local(e.linear.weight).copy_(e.quantized_weight())
    for name, p in non_quantized.items():
        assign(p, snapshot["non_quantized"][name])


def window_schedule(nsamples: int, batch_size: int, num_steps: int, seed: int) -> torch.Tensor:
    """``[num_steps, batch_size]`` window indices: consecutive epochs, each a seeded permutation."""
    generator = torch.Generator().manual_seed(seed * 7919 + 3)
    needed = num_steps * batch_size
    order = torch.cat([torch.randperm(nsamples, generator=generator) for _ in range(-(-needed // nsamples))])
    return order[:needed].view(num_steps, batch_size)


def check_batch_split(batch_size: int, microbatch_size: int, world_size: int) -> int:
    """The windows per process and step; raises ValueError unless ``batch_size`` divides into whole microbatches per process.

    A single process keeps the last, smaller microbatch of a batch that ``microbatch_size`` does not divide.
    """
    if world_size == 1:
        return batch_size
    if batch_size % (world_size * microbatch_size):
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of the number of processes {world_size} times "
            f"microbatch_size {microbatch_size} (= {world_size * microbatch_size}): each process takes an equal "
            "share of every batch in whole microbatches"
        )
    return batch_size // world_size


class _Trainer:
    """State and steps of one run in one process (see :func:`pv_tune`)."""

    def __init__(self, teacher, student, entries, non_quantized, optimizer, windows, eval_windows, config, world):
        self.world: World = world
        self.local_batch = check_batch_split(config.batch_size, config.microbatch_size, world.size)
        self.teacher, self.student = teacher, student
        self.entries, self.non_quantized = entries, non_quantized
        self.optimizer: PVOptimizer = optimizer
        self.windows, self.eval_windows = windows, eval_windows
        self.config = config
        self.student_decoder, self.student_head = split_decoder_and_head(student)
        self.teacher_decoder, self.teacher_head = split_decoder_and_head(teacher)
        self.schedule = window_schedule(windows.shape[0], config.batch_size, config.num_steps, config.seed)
        self.step = 0
        self.steps: list[dict] = []
        self.evaluations: list[dict] = []
        self.best: Optional[dict] = None
        self.earlier_seconds = 0.0  # wall time of the calls before a resume

    def train_step(self) -> float:
        """Forward/backward over this rank's microbatches of the next step; returns the mean KL per token.

        Each rank's loss is divided by the token count of the global batch and the gradients are
        summed over the ranks, so they are those of the mean loss over the global batch.
        """
        config = self.config
        batch = self.windows[self.schedule[self.step]]
        tokens = batch.numel()
        local = batch[self.world.rank * self.local_batch : (self.world.rank + 1) * self.local_batch]
        self.optimizer.zero_grad()
        total = 0.0
        for micro in local.split(config.microbatch_size):
            with autocast_context(config.bf16):
                student_hidden = hidden_states(self.student_decoder, micro)
                with torch.no_grad():
                    teacher_hidden = hidden_states(self.teacher_decoder, micro)
            loss_sum = distillation_loss_sum(
                student_hidden, teacher_hidden, self.student_head, self.teacher_head, config.bf16
            )
            value = float(loss_sum.detach())
            total += value
            if not math.isfinite(value):
                break
            (loss_sum / tokens).backward()
        (total,) = self.world.sum_floats([total])
        if not math.isfinite(total):
            raise FloatingPointError(
                f"the loss is {total} at step {self.step + 1}: training diverged or the student produces "
                "NaN/Inf (lower lr/code_lr, or disable bf16); the last checkpoint is left untouched"
            )
        self.world.sum_gradients(p for p in self.student.parameters() if not is_sharded(p))  # FSDP sums the rest
        return total / tokens

    def evaluate_windows(self, windows: torch.Tensor) -> Evaluation:
        """Evaluate the student on ``windows``, each rank on its share; the same result on every rank.

        With FSDP every rank runs the same number of forward passes (each gathers a block's weights
        from all ranks): a rank with one batch fewer runs one more on a window whose sums it drops.
        """
        batch_size = self.config.eval_batch_size
        share = windows[self.world.share(windows.shape[0])]
        nll, kl = evaluation_sums(self.student, self.teacher, share, batch_size)
        if self.fsdp:
            most = max(len(r) for r in self.world.batch_ranges(windows.shape[0]))
            if -(-share.shape[0] // batch_size) < -(-most // batch_size):
                evaluation_sums(self.student, self.teacher, windows[:1], batch_size)
        nll, kl = self.world.sum_floats([nll, kl])
        return evaluation_from_sums(nll, kl, windows.shape[0], windows.shape[1])

    @property
    def fsdp(self) -> bool:
        """Whether the decoder blocks are sharded over the processes."""
        return self.optimizer.fsdp

    def check_synchronised(self) -> None:
        """Raise RuntimeError if the ranks' trained state differs (see :meth:`aqlm.distributed.World.check_identical`);
        FSDP-sharded parameters are not compared (each rank holds other rows)."""
        tensors = [t for e in self.entries for t in (e.quantized.codes, e.quantized.codebooks, e.quantized.scales)]
        if self.config.update_non_quantized_parameters:
            tensors += [p for p in self.non_quantized.values() if not is_sharded(p)]
        self.world.check_identical(tensors, "codes, codebooks, scales or parameters")

    def evaluate(self) -> dict:
        result = self.evaluate_windows(self.eval_windows)
        record = {"step": self.step, "perplexity": result.perplexity, "kl": result.kl}
        self.evaluations.append(record)
        metric = record[self.config.select_by]
        if not math.isfinite(metric):
            raise FloatingPointError(f"held-out {self.config.select_by} is {metric} at step {self.step}")
        if self.config.keep_best and (self.best is None or metric < self.best["metric"]):
            self.best = {"metric": metric, "step": self.step, "state": _snapshot(self.entries, self.non_quantized)}
        return record

    def checkpoint_state(self, fingerprint: dict, seconds: float) -> Optional[dict]:
        """Everything a resumed run needs, whole, on rank 0 (None on the others); ``seconds``: wall time
        of the run so far, over all its calls. Every rank calls it: a sharded optimizer state is gathered."""
        self.optimizer.gather_state()
        if not self.world.is_main:
            return None
        return self._state(fingerprint, seconds, _snapshot(self.entries, self.non_quantized), self.optimizer.state_dict())

    def sharded_checkpoint_state(self, fingerprint: dict, seconds: float) -> tuple[Optional[dict], dict[str, torch.Tensor]]:
        """With FSDP (every rank calls it): the checkpoint without its moments and buffers, on rank 0
        (None on the others), and this rank's moments and buffers, sharded like their tensors, for
        ``torch.distributed.checkpoint``. The rest (codes, codebooks, scales, the other parameters)
        is small and whole."""
        model = _snapshot(self.entries, self.non_quantized)
        small, tensors = self.optimizer.sharded_state()
        if not self.world.is_main:
            return None, tensors
        return self._state(fingerprint, seconds, model, {**small, "tensor_names": sorted(tensors)}), tensors

    def _state(self, fingerprint: dict, seconds: float, model: dict, optimizer: dict) -> dict:
        return {
            "fingerprint": fingerprint,
            "seconds": seconds,
            "step": self.step,
            "steps": self.steps,
            "evaluations": self.evaluations,
            "best": self.best,
            "model": model,
            "optimizer": optimizer,
            "torch_rng": torch.get_rng_state(),
        }

    def load_checkpoint_state(self, state: dict) -> None:
        _restore_snapshot(state["model"], self.entries, self.non_quantized)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.steps = list(state["steps"])
        self.evaluations = list(state["evaluations"])
        self.best = state["best"]
        self.earlier_seconds = state.get("seconds", 0.0)
        torch.set_rng_state(state["torch_rng"])


def _unsharded_student(
    quantized_dir: Path, entries: list[QuantizedEntry], non_quantized: dict[str, nn.Parameter]
) -> nn.Module:
    """A whole student, to evaluate and save after FSDP training: the checkpoint loaded again, with the
    trained parameters gathered (a collective) and the layers' biases taken from it."""
    student = load_student(quantized_dir)
    with torch.no_grad():
        for name, parameter in non_quantized.items():
            student.get_parameter(name).copy_(whole(parameter.detach()))
    for entry in entries:
        entry.quantized.bias = student.get_submodule(entry.name).bias
    return student


def set_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn Transformers' (non-reentrant) activation checkpointing of the blocks on or off.

    Uses ``activation_checkpointing_enable`` where Transformers has it (5.x) and
    ``gradient_checkpointing_enable`` otherwise.
    """
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _no_log(line: str) -> None:
    """The log of ranks other than 0."""


def _prepare_output_dir(out_dir: Path, dense_dir: Path, quantized_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check that the run may write ``out_dir``; with ``overwrite`` (and no ``resume``), clear an earlier run there."""
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    checkpoint_path = checkpoint_dir / CHECKPOINT_FILE
    check_output_dir(out_dir, {"dense": dense_dir, "quantized": quantized_dir}, checkpoint_path, resume, overwrite)
    if overwrite and not resume:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
        (out_dir / REPORT_FILE).unlink(missing_ok=True)
    if (out_dir / REPORT_FILE).exists():
        raise FileExistsError(f"{out_dir} already holds a finished PV-Tuning run; choose another output directory")
    if checkpoint_path.exists() and not resume:
        raise FileExistsError(
            f"{out_dir} holds an unfinished run ({checkpoint_path}): pass resume=True (--resume) to continue it, "
            "or choose another output directory"
        )


def _save_checkpoint(trainer: _Trainer, fingerprint: dict, seconds: float, checkpoint_dir: Path) -> None:
    """Write the resumable state to ``checkpoint_dir`` (every rank calls it; without FSDP or a
    sharded optimizer state, rank 0 alone may).

    Without FSDP rank 0 writes one file, ``state.pt``. With FSDP every rank writes its rows of the
    moments and buffers with ``torch.distributed.checkpoint`` into ``tensors-STEP/`` (across
    machines, on a file system they share), and then rank 0 writes the rest to ``state.pt``, which
    names that directory: the checkpoint changes at that atomic rename, and no process ever holds
    the whole of the sharded state. Older ``tensors-*`` directories are removed after it.
    """
    world = trainer.world
    current = None
    if trainer.fsdp:
        import torch.distributed.checkpoint as dcp

        state, tensors = trainer.sharded_checkpoint_state(fingerprint, seconds)
        current = f"{SHARDED_TENSORS_PREFIX}{trainer.step}"
        world.on_main(lambda: shutil.rmtree(checkpoint_dir / current, ignore_errors=True))
        dcp.save(tensors, checkpoint_id=str(checkpoint_dir / current))
        world.barrier()
        if state is not None:
            state["sharded_tensors"] = current
    else:
        state = trainer.checkpoint_state(fingerprint, seconds)
    if world.is_main:
        atomic_save(state, checkpoint_dir / CHECKPOINT_FILE)
        for stale in checkpoint_dir.glob(SHARDED_TENSORS_PREFIX + "*"):
            if stale.name != current:
                shutil.rmtree(stale, ignore_errors=True)


def _load_sharded_tensors(state: dict, optimizer: PVOptimizer, checkpoint_dir: Path, world: World) -> None:
    """Put the moments and buffers of an FSDP checkpoint back into ``state["optimizer"]`` (every rank
    calls it): each rank reads its rows with FSDP, or whole tensors without."""
    import torch.distributed.checkpoint as dcp

    small = state["optimizer"]
    tensors = optimizer.sharded_tensor_targets(small["tensor_names"], whole_tensors=not optimizer.fsdp)
    with warnings.catch_warnings():  # one process reading a checkpoint of several is intended here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(tensors, checkpoint_id=str(checkpoint_dir / state["sharded_tensors"]), no_dist=not world.active)
    state["optimizer"] = join_sharded_state(small, tensors)


def _read_checkpoint(path: Path) -> Optional[dict]:
    """The resumable state at ``path``, or None when there is none."""
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def _eval_due(step: int, config: PVConfig) -> bool:
    return step == config.num_steps or (config.eval_every > 0 and step % config.eval_every == 0)


def pv_tune(
    dense_dir: Union[str, os.PathLike],
    quantized_dir: Union[str, os.PathLike],
    dataset: Dataset,
    out_dir: Union[str, os.PathLike],
    config: Optional[PVConfig] = None,
    *,
    eval_dataset: Optional[Dataset] = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
    callback: Optional[Callable[[dict], None]] = None,
) -> PVReport:
    """PV-tune the AQLM checkpoint ``quantized_dir`` towards its dense teacher ``dense_dir``.

    Args:
        dense_dir: the dense Hugging Face causal LM (the teacher).
        quantized_dir: its AQLM quantization (the student), e.g. from :func:`aqlm.quantize.quantize_model`.
        dataset: calibration text (.txt/.jsonl, needs the teacher's tokenizer) or tokens (.pt file
            or integer tensor): a 1-D stream, or 2-D ``[n, length]`` independent sequences whose
            windows start at the rows' beginnings (see :func:`aqlm.data.prepare_windows`).
        out_dir: receives the tuned Hugging Face AQLM checkpoint, ``pv_report.json`` and, while
            training, the resumable checkpoint ``pv_checkpoint/``.
        config: all settings (:class:`PVConfig`).
        eval_dataset: held-out data for periodic evaluation and keep-best; by default the last
            ``config.val_fraction`` of ``dataset``.
        resume: continue from ``out_dir/pv_checkpoint`` (same settings required); the run then
            gives the same result as an uninterrupted one. Without a checkpoint it starts afresh.
        overwrite: write into a non-empty ``out_dir``, discarding an earlier run's checkpoint and report.
        progress: show a progress bar (loss and fraction of codes changed per step).
        log: receives the evaluation lines.
        callback: called with each step's record after the step completes.

    Returns:
        A :class:`PVReport`.

    Raises:
        FileNotFoundError: a model directory or data file is missing.
        FileExistsError: ``out_dir`` is a file, or not empty and neither resumed nor overwritten, or it
            holds a finished run (without ``overwrite``).
        ValueError: ``out_dir`` is a model directory; bad settings, a student that is not AQLM or does not match the teacher, too few tokens.
        FloatingPointError: the loss became NaN or infinite.

    A KeyboardInterrupt between steps writes a checkpoint of the last finished step before it propagates.

    Under ``torchrun`` (an initialised ``torch.distributed`` process group) the run is data-parallel
    (see this module's description): every process calls ``pv_tune`` with the same
    arguments, each takes an equal share of every batch (``batch_size`` must then be a multiple of
    the number of processes times ``microbatch_size``), the result equals that of one process up
    to float rounding, and only rank 0 logs, shows progress and writes ``out_dir``. Every rank
    returns the same report and calls ``callback``.
    """
    started = time.perf_counter()
    config = config or PVConfig()
    world = World.current()
    check_batch_split(config.batch_size, config.microbatch_size, world.size)
    if not world.is_main:
        progress, log = False, _no_log
    dense_dir, quantized_dir, out_dir = Path(dense_dir), Path(quantized_dir), Path(out_dir)
    check_model_kind(dense_dir, "dense", "dense model")
    check_model_kind(quantized_dir, "aqlm", "quantized model")
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    checkpoint_path = checkpoint_dir / CHECKPOINT_FILE
    world.on_main(lambda: _prepare_output_dir(out_dir, dense_dir, quantized_dir, resume, overwrite))

    fsdp = config.fsdp and world.active
    # with FSDP the teacher loads in its stored dtype and each process converts its own rows to float32
    teacher, tokenizer = load_causal_lm(dense_dir, kind="dense", dtype=None if fsdp else torch.float32,
                                        use_cache=False, role="dense model")
    teacher.requires_grad_(False)
    student = load_student(quantized_dir)
    check_compatible(teacher, student)
    save_dtype = _stored_codebook_dtype(quantized_dir) if config.save_dtype == "auto" else _DTYPES[config.save_dtype]
    seqlen = min(config.seqlen, getattr(teacher.config, "max_position_embeddings", None) or config.seqlen)
    windows, eval_windows = prepare_windows(
        dataset, eval_dataset, tokenizer, nsamples=config.nsamples, seqlen=seqlen, seed=config.seed,
        val_fraction=config.val_fraction, eval_windows=config.eval_windows, vocab_size=int(teacher.config.vocab_size),
    )
    fingerprint = {
        "config": config.fingerprint(),
        "seqlen": seqlen,
        "dense": model_identity(dense_dir),
        "quantized": model_identity(quantized_dir),
        "dataset": _dataset_identity(dataset),
        "eval_dataset": _dataset_identity(eval_dataset),
    }

    entries, non_quantized = dequantized_student(student, on_meta=fsdp)  # with FSDP: never whole
    if fsdp:
        shard_decoders(teacher, student)
        teacher.float()
        non_quantized = {name: student.get_parameter(name) for name in non_quantized}  # FSDP's new parameters
    optimizer = PVOptimizer(entries, non_quantized, config)
    if optimizer.sharded:
        log(f"optimizer state sharded over {world.size} processes (ZeRO stage 1)")
    if optimizer.fsdp:
        log(f"decoder blocks of both models sharded over {world.size} processes (FSDP2)")
    elif config.fsdp:
        log("fsdp has no effect in a single process: the models stay whole")
    student.train()
    if config.gradient_checkpointing:
        set_checkpointing(student, True)
    trainer = _Trainer(teacher, student, entries, non_quantized, optimizer, windows, eval_windows, config, world)

    def elapsed() -> float:
        """Wall time of the whole run: earlier calls (when resumed) and this one."""
        return trainer.earlier_seconds + time.perf_counter() - started

    state = world.on_main(lambda: _read_checkpoint(checkpoint_path) if resume else None)
    if state is not None:
        if state["fingerprint"] != fingerprint:
            changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
            raise ValueError(
                f"cannot resume from {checkpoint_path}: it was made with other settings or inputs "
                f"({', '.join(changed)})"
            )
        if "sharded_tensors" in state:
            _load_sharded_tensors(state, optimizer, checkpoint_dir, world)
        trainer.load_checkpoint_state(state)
        log(f"resumed from {checkpoint_path} at step {trainer.step}")
    if world.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    if not trainer.evaluations or (_eval_due(trainer.step, config) and trainer.evaluations[-1]["step"] != trainer.step):
        record = trainer.evaluate()
        log(f"step {record['step']}: held-out perplexity {record['perplexity']:.4f}, KL {record['kl']:.5f}")
    saved_step = trainer.step

    mode = "PV-tuning" if config.update_codes else "P-tuning"
    bar = tqdm(total=config.num_steps, initial=trainer.step, desc=mode, disable=not progress)
    updating = False
    try:
        while trainer.step < config.num_steps:
            loss = trainer.train_step()
            updating = True
            stats = optimizer.step()
            trainer.step += 1
            record = {"step": trainer.step, "loss": loss, "codes_changed": stats.changed_fraction}
            trainer.steps.append(record)
            trainer.check_synchronised()
            updating = False
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", codes=f"{100 * stats.changed_fraction:.3f}%")
            if _eval_due(trainer.step, config):
                evaluation = trainer.evaluate()
                log(
                    f"step {trainer.step}: held-out perplexity {evaluation['perplexity']:.4f}, "
                    f"KL {evaluation['kl']:.5f}"
                )
            if config.save_every and trainer.step % config.save_every == 0:
                _save_checkpoint(trainer, fingerprint, elapsed(), checkpoint_dir)
                saved_step = trainer.step
            if callback is not None:
                callback(record)
    except KeyboardInterrupt:
        if optimizer.sharded or optimizer.fsdp:  # saving shards is a collective, unsafe after an interrupt
            if trainer.step > saved_step:
                what = "the model" if optimizer.fsdp else "the optimizer state"
                log(f"interrupted at step {trainer.step}: with {what} sharded only the periodic "
                    f"checkpoints (save_every) are kept; --resume starts again from step {saved_step}")
        elif not updating and trainer.step > saved_step and world.is_main:
            _save_checkpoint(trainer, fingerprint, elapsed(), checkpoint_dir)  # unsharded: rank 0 alone writes
            log(f"interrupted: saved a checkpoint at step {trainer.step} in {checkpoint_dir}; resume to continue")
        raise
    finally:
        bar.close()

    best_step = trainer.step
    if config.keep_best and trainer.best is not None:
        _restore_snapshot(trainer.best["state"], entries, non_quantized)
        best_step = trainer.best["step"]
    held_mib = (local_bytes(student.parameters()) + local_bytes(optimizer.buffers.values())
                + local_bytes(teacher.parameters()) + optimizer.state_bytes()
                + local_bytes(t for e in entries for t in (e.quantized.codes, e.quantized.codebooks, e.quantized.scales))
                ) / 2**20
    if config.gradient_checkpointing:
        set_checkpointing(student, False)
    if optimizer.fsdp:
        student = _unsharded_student(quantized_dir, entries, non_quantized)
        trainer.student = student
    student.eval()
    student.requires_grad_(False)
    restore_quantized(student, entries, save_dtype)
    final = trainer.evaluate_windows(eval_windows)
    this_call = time.perf_counter() - started
    report = PVReport(
        out_dir=out_dir,
        config=config.to_dict(),
        steps=trainer.steps,
        evaluations=trainer.evaluations,
        best_step=best_step,
        final={"step": best_step, "perplexity": final.perplexity, "kl": final.kl},
        seconds=this_call,
        total_seconds=trainer.earlier_seconds + this_call,
        extra={
            "seqlen": seqlen, "eval_windows": int(eval_windows.shape[0]), "save_dtype": str(save_dtype),
            "processes": world.size,
            "optimizer_state_mib_rank0": optimizer.state_bytes() / 2**20,
            "optimizer_state_sharded": optimizer.sharded,
            "fsdp": optimizer.fsdp,
            "tensors_mib_rank0": held_mib,
        },
    )
    if world.is_main:
        save_quantized(student, out_dir, tokenizer, storage_dtype=save_dtype)
        atomic_write_text(out_dir / REPORT_FILE, json.dumps(report.to_dict(), indent=2))
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    world.barrier()
    return report
