"""AQLM calibration of a whole Hugging Face causal LM, block by block, resumable.

For every transformer block in order: run the dense block on its inputs (the outputs of the
already-quantized blocks before it) to get fine-tuning targets; quantize its linears group by
group in execution order (q/k/v, then o, then gate/up, then down), collecting each group's XTX
from the block as already quantized, so later layers see the changes of earlier ones; fine-tune
the block; write it to the output directory at once; feed its outputs to the next block.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..calibration import capture_block_inputs, find_linears, get_blocks
from ..data import calibration_windows, load_tokens
from ..distributed import World
from ..fileio import atomic_write_text, check_output_dir, file_sha256, make_readable, model_identity, tokens_sha256
from ..format import AqlmScheme
from ..hf import load_causal_lm, save_quantized
from ..inference import QuantizedLinear
from .distributed import CoreShare, assign_owners, run_block_split, torch_threads, tree_nodes, tree_sum
from .finetune import FinetuneConfig, finetune_block, trainable_parameters
from .layer import LayerConfig, quantize_weight
from .phases import PhaseTimer

logger = logging.getLogger(__name__)

PROGRESS_DIR = "aqlm_progress"
REPORT_FILE = "quantization_report.json"
_PARAM_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class QuantizeConfig:
    """Everything that determines the result of a model quantization run.

    Attributes:
        layer: per-layer AQLM settings (scheme, beam size, epochs, ...).
        finetune: block fine-tuning settings.
        nsamples: calibration windows for quantization and fine-tuning.
        val_size: extra held-out windows for fine-tuning's early stopping and keep-best.
        seqlen: tokens per calibration window (capped at the model's maximum context).
        seed: calibration windows, k-means, search order and fine-tuning order all derive from it.
        true_sequential: collect each group's XTX after the groups before it are quantized
            (False: one collection for all linears of a block, as upstream's default).
        param_dtype: storage dtype of codebooks, scales, biases and every non-quantized parameter
            (embeddings, norms, output head), "float16" as in upstream checkpoints. The saved model is
            still built in float32 by ``from_pretrained``.
        batch_size: windows per forward pass when collecting statistics.
        forward_dtype: "float32", or "bfloat16" to run the blocks' forward passes (dense targets,
            X^T X collection, output checks and the next blocks' inputs) under bfloat16 autocast;
            X^T X products and all parameters stay float32. Much faster on CPUs with AMX or
            AVX-512 BF16, slower on CPUs without bfloat16 instructions.
    """

    layer: LayerConfig = field(default_factory=LayerConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    nsamples: int = 128
    val_size: int = 0
    seqlen: int = 2048
    seed: int = 0
    true_sequential: bool = True
    param_dtype: str = "float16"
    batch_size: int = 1
    forward_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.nsamples < 1 or self.val_size < 0 or self.seqlen < 2 or self.batch_size < 1:
            raise ValueError("need nsamples >= 1, val_size >= 0, seqlen >= 2 and batch_size >= 1")
        if self.forward_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"forward_dtype must be 'float32' or 'bfloat16', got {self.forward_dtype!r}")
        if self.param_dtype not in _PARAM_DTYPES:
            raise ValueError(f"param_dtype must be one of {sorted(_PARAM_DTYPES)}, got {self.param_dtype!r}")

    def forward_precision(self, device: torch.device) -> torch.autocast:
        """The autocast context of the block forward passes (disabled for float32)."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.forward_dtype == "bfloat16")

    def to_dict(self) -> dict:
        """Plain-JSON form, used to check that a resumed run continues the same job."""
        data = dataclasses.asdict(self)
        data["layer"] = self.layer.to_dict()
        data["layer"].pop("num_threads", None)  # does not change the result
        return data


@dataclass
class LayerReport:
    """One quantized linear: its name, shape, bits per weight and relative output errors."""

    name: str
    shape: tuple[int, int]
    bits_per_weight: float
    initial_error: float
    final_error: float
    epochs: int
    seconds: float


@dataclass
class QuantizationReport:
    """The outcome of :func:`quantize_model`."""

    out_dir: Path
    layers: list[LayerReport]
    quantized_parameters: int
    total_parameters: int
    quantized_bits: float
    model_bits: float
    seconds: float
    checkpoint_bytes: int = 0
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        """Average storage of the quantized linears (codes, codebooks and scales) per weight."""
        return self.quantized_bits / max(self.quantized_parameters, 1)

    @property
    def model_bits_per_parameter(self) -> float:
        """The whole model's storage per parameter (unquantized parameters at their saved width)."""
        return self.model_bits / max(self.total_parameters, 1)

    def summary(self) -> str:
        """A few human-readable lines (the last one: wall time per phase)."""
        mean_error = sum(layer.final_error for layer in self.layers) / max(len(self.layers), 1)
        text = (
            f"quantized {len(self.layers)} linear layers ({self.quantized_parameters / 1e6:.1f}M weights) "
            f"at {self.bits_per_weight:.3f} bits/weight including codebooks and scales; whole model "
            f"{self.model_bits_per_parameter:.2f} bits/parameter ({self.model_bits / 8 / 2**20:.1f} MiB); "
            f"mean relative layer error {mean_error:.4f}; checkpoint {self.checkpoint_bytes / 2**20:.1f} MiB on disk; "
            f"wall time {self.seconds:.0f} s"
        )
        if self.phases:
            other = self.seconds - sum(self.phases.values())
            listed = ", ".join(f"{name} {value:.1f} s" for name, value in self.phases.items())
            text += f"\nphases (this run): {listed}, other {other:.1f} s"
        return text


class ProgressStore:
    """Finished blocks of a run, written to ``out_dir/aqlm_progress`` the moment each completes.

    A block counts as done once its ``.json`` record exists; the tensors are written before it,
    each file to a temporary name and renamed, so a run killed at any moment leaves only whole
    blocks behind.
    """

    def __init__(self, out_dir: Path, fingerprint: dict):
        self.directory = out_dir / PROGRESS_DIR
        self.fingerprint = fingerprint

    def _config_path(self) -> Path:
        return self.directory / "config.json"

    def start(self, resume: bool) -> None:
        """Create the store, or check on ``resume`` that it belongs to the same job."""
        path = self._config_path()
        if path.exists():
            if not resume:
                raise FileExistsError(
                    f"{self.directory} holds an earlier run: pass resume=True (--resume) to continue it, "
                    "or choose another output directory"
                )
            saved = json.loads(path.read_text())
            if saved != self.fingerprint:
                changed = sorted(k for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k))
                raise ValueError(f"cannot resume: the run in {self.directory} used other settings ({', '.join(changed)})")
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.fingerprint, indent=2, sort_keys=True))

    def discard(self) -> None:
        """Delete an earlier run's progress, if any."""
        shutil.rmtree(self.directory, ignore_errors=True)

    def done(self, index: int) -> bool:
        """Whether block ``index`` was finished by this or an earlier run."""
        return (self.directory / f"block_{index:04d}.json").exists()

    def save(self, index: int, block: nn.Module, record: dict) -> None:
        """Write block ``index`` (all its tensors) and then its record."""
        tensors = {name: tensor.detach().contiguous() for name, tensor in block.state_dict().items()}
        target = self.directory / f"block_{index:04d}.safetensors"
        temporary = target.with_suffix(".tmp")
        save_file(tensors, str(temporary))
        os.replace(temporary, target)
        make_readable([target])
        atomic_write_text(self.directory / f"block_{index:04d}.json", json.dumps(record, indent=2))

    def read(self, index: int) -> tuple[dict, dict[str, torch.Tensor]]:
        """The record and the tensors of finished block ``index`` (see :func:`restore_block`)."""
        record = json.loads((self.directory / f"block_{index:04d}.json").read_text())
        return record, load_file(str(self.directory / f"block_{index:04d}.safetensors"))

    def remove_blocks(self) -> None:
        """Delete the per-block files once the final checkpoint is written."""
        for path in self.directory.glob("block_*"):
            path.unlink()


def restore_block(block: nn.Module, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Put a finished block's tensors (:meth:`ProgressStore.read`) into ``block``, replacing its quantized linears."""
    for layer in record["layers"]:
        name = layer["name"]
        quantized = QuantizedLinear.from_parts(
            tensors[f"{name}.codes"], tensors[f"{name}.codebooks"], tensors[f"{name}.scales"], tensors.get(f"{name}.bias")
        )
        block.set_submodule(name, quantized)
    block.load_state_dict(tensors, strict=True)


def _identity(source: str | os.PathLike | torch.Tensor) -> dict:
    """What the resume fingerprint records of a file (path and digest) or of a token tensor (digest)."""
    if isinstance(source, torch.Tensor):
        return {"tokens_sha256": tokens_sha256(source)}
    return {"path": str(Path(source).resolve()), "sha256": file_sha256(Path(source))}


def input_groups(block: nn.Module, sample: torch.Tensor, block_kwargs: dict) -> list[list[str]]:
    """The block's linears grouped by shared input, in execution order (e.g. [q, k, v], [o], [gate, up], [down]).

    Inputs are compared by identity, and every recorded input is kept alive until the end, so a
    freed buffer reused for a later input can never make two groups look alike.
    """
    calls: list[tuple[str, torch.Tensor]] = []
    handles = []

    def hook_for(name):
        def hook(module, args):
            if all(name != seen for seen, _ in calls):
                calls.append((name, args[0]))
        return hook

    for name, module in find_linears(block).items():
        handles.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        with torch.no_grad():
            block(sample, **block_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for name, tensor in calls:
        for shared, names in groups:
            if shared is tensor:
                names.append(name)
                break
        else:
            groups.append((tensor, [name]))
    return [names for _, names in groups]


class _InputsCollected(Exception):
    """Raised by collect_xtx's hooks to end a forward pass once every input it needs is recorded."""


# A partial X^T X sum over some forward passes: float64 sums and token counts per linear name;
# linears that shared one product on every pass share one sum tensor.
_Partial = tuple[dict[str, torch.Tensor], dict[str, int]]


def _add_partials(left: _Partial, right: _Partial) -> _Partial:
    """``left + right`` per linear, one addition per pair of summed tensors (keeps the sharing)."""
    sums: dict[str, torch.Tensor] = {}
    made: dict[tuple[int, int], torch.Tensor] = {}
    for name, tensor in left[0].items():
        key = (id(tensor), id(right[0][name]))
        if key not in made:
            made[key] = tensor + right[0][name]
        sums[name] = made[key]
    return sums, {name: rows + right[1][name] for name, rows in left[1].items()}


def _share_partial(partial: Optional[_Partial], names: list[str], world: World, src: int, device: torch.device) -> _Partial:
    """Rank ``src``'s partial sum on every rank, with the same sharing of tensors between linears."""
    if world.size == 1:
        return partial
    layout = None
    if world.rank == src:
        sums, rows = partial
        groups: list[list[str]] = []
        for name in names:
            group = next((group for group in groups if sums[group[0]] is sums[name]), None)
            if group is None:
                groups.append([name])
            else:
                group.append(name)
        layout = ([(group, tuple(sums[group[0]].shape), sums[group[0]].dtype) for group in groups], rows)
    groups, rows = world.broadcast_object(layout, src)
    shared: dict[str, torch.Tensor] = {}
    for group, shape, dtype in groups:
        tensor = partial[0][group[0]] if world.rank == src else torch.empty(shape, dtype=dtype, device=device)
        world.broadcast_tensor(tensor, src)
        shared.update(dict.fromkeys(group, tensor))
    return shared, rows


class ForwardReplay:
    """Outputs of a block's submodules recorded in one :func:`collect_xtx` pass and replayed in the
    next pass over the same windows, so that consecutive groups' passes do not recompute them.

    A pass records the output of every submodule whose forward finishes before the first call of
    a linear of the group being collected (called once up to then). Between that pass and the
    next, only this group's linears change (they are quantized), and with groups in execution
    order (:func:`input_groups`) nothing that finished before their first call depends on them:
    the next pass computes the same bits for those modules, so it takes their recorded outputs
    instead (the outermost ones; a later call of a replayed module runs it). For a Llama block,
    the o_proj pass replays q/k/v, and the down_proj pass the whole attention and both norms.
    Outputs are kept per pass number, one pass deep: each rank records only its own passes.
    """

    def __init__(self, block: nn.Module):
        self.block = block
        self.recorded: dict[int, dict[str, Any]] = {}

    @contextmanager
    def pass_of(self, number: int, names: list[str]) -> Iterator[None]:
        """Replay what the previous pass ``number`` recorded, and record this one, whose group is ``names``."""
        replayed = self.recorded.pop(number, {})
        outermost = [name for name in replayed if not any(name.startswith(other + ".") for other in replayed)]
        calls: dict[str, int] = {}
        outputs: dict[str, Any] = {}
        frozen = [False]  # set at the group's first linear call

        def count(name):
            def hook(module, args):
                calls[name] = calls.get(name, 0) + 1
            return hook

        def record(name):
            def hook(module, args, output):
                if not frozen[0] and calls.get(name) == 1:
                    outputs[name] = output
            return hook

        def freeze(module, args):
            frozen[0] = True

        def replayer(module: nn.Module, output: Any) -> Callable:
            compute, used = module.forward, [False]

            def forward(*args, **kwargs):
                if used[0]:
                    return compute(*args, **kwargs)
                used[0] = True
                return output
            return forward

        handles, overridden = [], []
        try:
            for name, module in self.block.named_modules():
                if name:
                    handles.append(module.register_forward_pre_hook(count(name)))
                    handles.append(module.register_forward_hook(record(name)))
            handles += [self.block.get_submodule(name).register_forward_pre_hook(freeze) for name in names]
            for name in outermost:
                module = self.block.get_submodule(name)
                module.forward = replayer(module, replayed[name])
                overridden.append(module)
            yield
            self.recorded[number] = outputs
        finally:
            for handle in handles:
                handle.remove()
            for module in overridden:
                del module.forward


def collect_xtx(
    block: nn.Module,
    inputs: torch.Tensor,
    block_kwargs: dict,
    names: list[str],
    batch_size: int,
    world: Optional[World] = None,
    replay: Optional[ForwardReplay] = None,
) -> dict[str, torch.Tensor]:
    """XTX / n_tokens (accumulated in float64) of the inputs of the named linears of ``block``.

    Each forward pass (one batch of ``batch_size`` windows) contributes one float64 product per
    linear, and the products are added by the fixed binary tree over the pass index of
    :func:`~aqlm.quantize.distributed.tree_sum`. With several processes (``world``), each rank runs
    its own run of batches, sums the largest subtrees inside it, and every rank completes the upper
    levels from the gathered subtree sums: the result is bit-identical for every world size.

    Linears fed the same input tensor (q/k/v, gate/up) share one product per forward pass and,
    when they shared it on every pass, one result tensor; the values are those of a separate
    product per linear. Each pass stops as soon as the last of the named linears has its input,
    so the rest of the block (all of it after q/k/v, say) is not computed. With ``replay`` (one
    :class:`ForwardReplay` for the consecutive groups of one block, true-sequential), each pass
    also takes from the previous group's pass the outputs that cannot have changed: the same
    values, less computation.
    """
    world = world or World()
    current: dict[str, Any] = {}  # this pass's products and rows, and [input, product, rows] of the latest product
    seen: set[str] = set()

    def hook_for(name):
        def hook(module, args):
            last = current.get("last")
            if last is None or last[0] is not args[0]:
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # NaN/Inf: checked on the sums
                with torch.autocast(x.device.type, enabled=False):  # float32 products under bfloat16 passes
                    last = current["last"] = (args[0], (x.T @ x).double(), x.shape[0])
            _, product, rows = last
            products, counts = current["partial"]
            products[name] = product if name not in products else products[name] + product
            counts[name] = counts.get(name, 0) + rows
            seen.add(name)
            if len(seen) == len(names):
                raise _InputsCollected
        return hook

    def one_pass(number: int) -> _Partial:
        seen.clear()
        current["partial"] = ({}, {})
        with replay.pass_of(number, names) if replay is not None else nullcontext():
            try:
                block(inputs[number * batch_size : (number + 1) * batch_size], **block_kwargs)
            except _InputsCollected:
                pass
        current.pop("last", None)
        if len(seen) != len(names):
            missing = sorted(set(names) - seen)
            raise ValueError(f"the block's forward pass never called {', '.join(missing)}")
        return current.pop("partial")

    passes = -(-inputs.shape[0] // batch_size)
    owners = {
        node: rank
        for rank, batches in enumerate(world.batch_ranges(passes))
        for node in tree_nodes(0, passes, batches.start, batches.stop)
    }
    handles = [block.get_submodule(name).register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        with torch.no_grad():
            computed = {node: tree_sum(*node, one_pass, _add_partials) for node, rank in owners.items() if rank == world.rank}
    finally:
        for handle in handles:
            handle.remove()
    known = {node: _share_partial(computed.get(node), names, world, rank, inputs.device) for node, rank in owners.items()}
    sums, counts = tree_sum(0, passes, one_pass, _add_partials, known)  # every node below the known ones is known
    results: dict[tuple[int, int], torch.Tensor] = {}
    for name in names:
        key = (id(sums[name]), counts[name])
        if key not in results:
            if not torch.isfinite(sums[name]).all():  # a NaN or Inf in any pass's inputs reaches the sum
                raise ValueError(f"calibration activations entering {name} contain NaN or Inf (or overflow X^T X)")
            results[key] = (sums[name] / counts[name]).float()
    return {name: results[(id(sums[name]), counts[name])] for name in names}


def _duration(seconds: float) -> str:
    """``1 h 02 min``, ``3 min 05 s`` or ``12 s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


def _param_bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


def _check_model(model: nn.Module, scheme: AqlmScheme) -> None:
    blocks = get_blocks(model)
    found = 0
    for index, block in enumerate(blocks):
        for name, linear in find_linears(block).items():
            try:
                scheme.check_shape(linear.out_features, linear.in_features)
            except ValueError as error:
                raise ValueError(f"model.layers.{index}.{name} ({linear.out_features}x{linear.in_features}): {error}") from None
            found += 1
    if found == 0:
        raise ValueError("the model's transformer blocks contain no nn.Linear layers to quantize")
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not torch.isfinite(parameter).all():
            raise ValueError(f"model parameter {name} contains NaN or Inf")


def load_dense_model(model_dir: str | os.PathLike) -> tuple[nn.Module, Any]:
    """A dense Hugging Face causal LM in float32 and its tokenizer (None when it has none).

    A thin wrapper of :func:`aqlm.hf.load_causal_lm`, the package's one model loader.
    """
    return load_causal_lm(model_dir, kind="dense", dtype=torch.float32, use_cache=False)


def quantize_model(
    model_dir: str | os.PathLike,
    dataset: str | os.PathLike | torch.Tensor,
    out_dir: str | os.PathLike,
    config: QuantizeConfig,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = tqdm.write,
    overwrite: bool = False,
    world: Optional[World] = None,
) -> QuantizationReport:
    """Quantize every linear layer of the transformer blocks of ``model_dir`` with AQLM.

    Args:
        model_dir: a dense Hugging Face causal LM (Llama/Mistral/Qwen2-style: ``model.model.layers``).
        dataset: calibration text (.txt, .jsonl) or tokens (.pt), or a 1-D token tensor.
        out_dir: written as a Hugging Face checkpoint that ``AutoModelForCausalLM.from_pretrained``
            loads with this package installed; progress is kept in ``out_dir/aqlm_progress``.
        config: all settings; see :class:`QuantizeConfig`.
        resume: continue a killed run from its last finished block (same settings required).
        progress: show progress bars.
        log: receives one line per quantized layer and per block.
        overwrite: write into a non-empty ``out_dir`` (an earlier unfinished run in it is discarded).
            Without it, a non-empty ``out_dir`` is refused unless ``resume`` continues its run.
        world: the processes sharing the work (see :mod:`aqlm.quantize.distributed`); None: the
            initialized torch.distributed default group (every rank calls this function with the
            same arguments), else this process alone. Rank 0 alone reads and writes ``out_dir``
            and logs; the checkpoint is bit-identical for every world size, given the same
            threads per process.

    Returns:
        A :class:`QuantizationReport` (also written to ``out_dir/quantization_report.json``).

    Raises:
        FileExistsError: ``out_dir`` is a file, or non-empty and neither resumed nor overwritten.
        ValueError: ``out_dir`` is ``model_dir``; bad settings or model.
    """
    started = time.perf_counter()
    timer = PhaseTimer()
    out_dir = Path(out_dir)
    world = world or World.current()
    if not world.is_main:
        log, progress = (lambda line: None), False
    else:
        if resume and not overwrite and (out_dir / REPORT_FILE).exists():
            raise FileExistsError(
                f"output directory {out_dir} holds a finished run ({REPORT_FILE}): there is nothing to resume; "
                "quantize again with --overwrite, or choose an empty directory"
            )
        check_output_dir(out_dir, {"input": Path(model_dir)}, out_dir / PROGRESS_DIR / "config.json", resume, overwrite)
    model, tokenizer = load_dense_model(model_dir)
    scheme = config.layer.scheme
    _check_model(model, scheme)
    seqlen = min(config.seqlen, getattr(model.config, "max_position_embeddings", config.seqlen))
    tokens = load_tokens(dataset, tokenizer)
    windows = calibration_windows(tokens, config.nsamples + config.val_size, seqlen, config.seed)
    fingerprint = {
        "config": config.to_dict(),
        "seqlen": seqlen,
        "model": model_identity(Path(model_dir)),
        "dataset": _identity(dataset),
    }
    store = ProgressStore(out_dir, fingerprint)
    if world.is_main:
        if overwrite and not resume:
            store.discard()
        store.start(resume)

    param_dtype = _PARAM_DTYPES[config.param_dtype]
    blocks = get_blocks(model)
    train_windows, val_windows = windows[: config.nsamples], windows[config.nsamples :]
    with timer.phase("calibration"):  # on every rank: only the embeddings run
        inputs, block_kwargs = capture_block_inputs(model, train_windows, config.batch_size, progress)
        val_inputs = capture_block_inputs(model, val_windows, config.batch_size, False)[0] if len(val_windows) else None

    share = CoreShare.gather(world, torch.get_num_threads())
    if world.size > 1:
        log(f"{world.size} processes share the work; rank 0 writes {out_dir} and fine-tunes the blocks")
    reports: list[LayerReport] = []
    earlier_seconds = 0.0  # recorded wall time of the blocks that earlier calls finished
    first_block_seconds: Optional[float] = None
    for index in tqdm(range(len(blocks)), desc="blocks", disable=not progress):
        block = blocks[index]
        outputs = None
        saved = world.broadcast_object(store.read(index) if world.is_main and store.done(index) else None, src=0)
        if saved is not None:
            record = saved[0]
            earlier_seconds += record.get("seconds", 0.0)
            restore_block(block, *saved)
            log(f"block {index}: restored from {store.directory}")
        else:
            block_started = time.perf_counter()
            block_timer = PhaseTimer()
            record, outputs = _quantize_block(
                block, index, inputs, val_inputs, block_kwargs, config, param_dtype, progress, log, block_timer, world,
                share,
            )
            record["phases"] = block_timer.as_dict()
            record["seconds"] = time.perf_counter() - block_started
            with block_timer.phase("saving"):
                if world.is_main:
                    store.save(index, block, record)
                world.barrier()  # a run killed from here on has this block on disk, whichever rank dies
            timer.add(block_timer.as_dict(), block_timer.cpu_dict())
            if first_block_seconds is None and world.is_main:
                first_block_seconds = time.perf_counter() - block_started
                remaining = sum(not store.done(later) for later in range(index + 1, len(blocks)))
                log(
                    f"block {index} took {first_block_seconds:.1f} s ({block_timer.summary()}); "
                    f"ETA for the {remaining} remaining blocks: {_duration(first_block_seconds * remaining)}"
                )
        reports += [LayerReport(**{**layer, "shape": tuple(layer["shape"])}) for layer in record["layers"]]
        with timer.phase("calibration"):
            with config.forward_precision(inputs.device):
                if outputs is None:
                    run_block_split(block, inputs, block_kwargs, config.batch_size, world, out=inputs)
                else:
                    inputs = outputs
                if val_inputs is not None:
                    run_block_split(block, val_inputs, block_kwargs, config.batch_size, world, out=val_inputs)

    with timer.phase("saving"):
        if world.is_main:
            save_quantized(model, out_dir, tokenizer, storage_dtype=param_dtype)
    checkpoint_bytes = sum(path.stat().st_size for path in out_dir.glob("model*.safetensors")) if world.is_main else 0
    quantized_parameters = sum(r.shape[0] * r.shape[1] for r in reports)
    quantized_bits = sum(r.bits_per_weight * r.shape[0] * r.shape[1] for r in reports)
    quantized_ids = {id(p) for m in model.modules() if isinstance(m, QuantizedLinear) for p in m.parameters()}
    other_bits = sum(
        p.numel() * (_param_bits(param_dtype) if p.is_floating_point() else p.element_size() * 8)
        for p in model.parameters() if id(p) not in quantized_ids
    )
    total_parameters = quantized_parameters + sum(p.numel() for p in model.parameters() if id(p) not in quantized_ids)
    report = QuantizationReport(
        out_dir=out_dir,
        layers=reports,
        quantized_parameters=quantized_parameters,
        total_parameters=total_parameters,
        quantized_bits=quantized_bits,
        model_bits=quantized_bits + other_bits,
        seconds=time.perf_counter() - started,
        checkpoint_bytes=checkpoint_bytes,
    )
    report.phases = timer.as_dict()
    report.seconds = time.perf_counter() - started
    payload = {
        "summary": report.summary(),
        "bits_per_weight": report.bits_per_weight,
        "model_bits_per_parameter": report.model_bits_per_parameter,
        "seconds": report.seconds,
        "total_seconds": report.seconds + earlier_seconds,
        "checkpoint_bytes": report.checkpoint_bytes,
        "phase_seconds": report.phases,
        "phase_cpu_seconds": timer.cpu_dict(),
        "config": fingerprint,
        "layers": [dataclasses.asdict(layer) for layer in reports],
    }
    if world.is_main:
        atomic_write_text(out_dir / REPORT_FILE, json.dumps(payload, indent=2))
        store.remove_blocks()
    world.barrier()  # every rank returns once the checkpoint is complete
    log(report.summary())
    return report


def _count(number: int, noun: str) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _quantize_block(
    block: nn.Module,
    index: int,
    inputs: torch.Tensor,
    val_inputs: Optional[torch.Tensor],
    block_kwargs: dict,
    config: QuantizeConfig,
    param_dtype: torch.dtype,
    progress: bool,
    log: Callable[[str], None],
    timer: PhaseTimer,
    world: World,
    share: CoreShare,
) -> tuple[dict, torch.Tensor]:
    """Quantize and fine-tune ``block``; returns its record and its outputs on ``inputs`` (the
    inputs of the next block, computed once for the output check).

    With several processes, forward passes and X^T X are split by batch, the linears of each
    input group are shared out between ranks, and rank 0 fine-tunes; ranks with work borrow the
    threads of the idle ranks on their machine (see :mod:`aqlm.quantize.distributed`).
    """
    started = time.perf_counter()
    with timer.phase("calibration"), config.forward_precision(inputs.device):
        targets = run_block_split(block, inputs, block_kwargs, config.batch_size, world)
        val_targets = None
        if val_inputs is not None:
            val_targets = run_block_split(block, val_inputs, block_kwargs, config.batch_size, world)
        if config.true_sequential:
            groups = input_groups(block, inputs[:1], block_kwargs)
        else:
            groups = [list(find_linears(block))]
    scheme = config.layer.scheme
    layers = []
    names = [name for group in groups for name in group]
    replay = ForwardReplay(block)
    for group in groups:
        with timer.phase("xtx"), config.forward_precision(inputs.device):
            xtx = collect_xtx(block, inputs, block_kwargs, group, config.batch_size, world, replay)
        linears = [block.get_submodule(name) for name in group]
        owners = assign_owners([linear.weight.numel() for linear in linears], world.size)
        lent = share.lent_to(set(owners))
        layer_config = config.layer
        if lent:
            own = config.layer.num_threads or torch.get_num_threads()
            layer_config = dataclasses.replace(config.layer, num_threads=own + lent)
        with torch_threads(torch.get_num_threads() + lent):
            results = {
                name: quantize_weight(
                    linear.weight.detach(), xtx[name], layer_config, layer_seed=index * 1000 + names.index(name),
                    timer=timer,
                )
                for name, linear, owner in zip(group, linears, owners)
                if owner == world.rank
            }
        for name, linear, owner in zip(group, linears, owners):
            result = world.broadcast_object(results.get(name), src=owner)
            bias = None if linear.bias is None else linear.bias.detach().float()
            block.set_submodule(name, QuantizedLinear.from_parts(result.codes, result.codebooks, result.scales, bias))
            bits = scheme.bits_per_weight(linear.out_features, linear.in_features, _param_bits(param_dtype))
            layers.append(
                {
                    "name": name,
                    "shape": [linear.out_features, linear.in_features],
                    "bits_per_weight": bits,
                    "initial_error": result.initial_error,
                    "final_error": result.final_error,
                    "epochs": result.epochs,
                    "seconds": result.seconds,
                }
            )
            log(
                f"block {index} {name} {linear.out_features}x{linear.in_features} {scheme.name}: relative error "
                f"{result.initial_error:.4f} -> {result.final_error:.4f} in {result.epochs} epochs, {result.seconds:.1f} s"
                + (f" on rank {owner} with {_count(result.threads, 'thread')}" if world.active else "")
            )
    # Fine-tuning's steps follow one another, so it runs on rank 0 alone, with the threads of the
    # other ranks on its machine, and rank 0 sends the trained parameters.
    with timer.phase("finetune"):
        def finetune() -> dict:
            with torch_threads(torch.get_num_threads() + share.lent_to({0})):
                if world.active:
                    log(f"block {index}: fine-tuning on rank 0 with {_count(torch.get_num_threads(), 'thread')}")
                return finetune_block(
                    block, inputs, targets, block_kwargs, config.finetune, seed=config.seed * 1000003 + index,
                    val_inputs=val_inputs, val_targets=val_targets, progress=progress,
                )

        losses = world.on_main(finetune)
        for parameter in trainable_parameters(block):
            world.broadcast_tensor(parameter.data, src=0)
    for module in block.modules():
        if isinstance(module, QuantizedLinear):
            for name in ("codebooks", "scales", "bias"):
                parameter = getattr(module, name)
                if parameter is not None:
                    setattr(module, name, nn.Parameter(parameter.detach().to(param_dtype), requires_grad=False))
    with timer.phase("output_check"), torch.no_grad():
        with config.forward_precision(inputs.device):
            outputs = run_block_split(block, inputs, block_kwargs, config.batch_size, world)
        output_error = float(((outputs - targets) ** 2).mean() / (targets**2).mean())
    log(f"block {index}: relative output error {output_error:.4f} after fine-tuning, {time.perf_counter() - started:.1f} s")
    return {"layers": layers, "finetune": losses, "output_error": output_error}, outputs
