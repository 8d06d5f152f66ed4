"""The PV optimizer: a P step on continuous parameters and a V step on the discrete codes.

The student is trained in a de-quantized form: every ``QuantizedLinear`` is replaced in the
model by an ``nn.Linear`` whose weight is a float32 copy of the de-quantized weight, so one
backward pass gives ``dL/dW`` for every quantized layer. One :meth:`PVOptimizer.step` then does,
in the order of upstream AQLM's ``StraightThroughAdamW.step`` (``src/pv_optimizer.py``):

1. propagate ``dL/dW`` to codebooks and scales (chain rule through the de-quantization formula)
   and, in the straight-through modes, to the straight-through buffers;
2. one Adam/LAMB step on all optimized tensors: non-quantized parameters and codebooks/scales
   with ``lr`` and ``(beta1, beta2)``, the V-step tensors (de-quantized weights or buffers) with
   ``code_lr`` and ``(code_beta1, code_beta2)``;
3. re-encode the codes of every quantized layer towards its V-step target (see
   :mod:`aqlm.pv_tuning.reencode`), using the codebooks and scales updated in 2; in penalized
   straight-through mode, pull the buffers towards the new quantized weights;
4. overwrite the de-quantized weights in the model with the new quantized weights.

Per layer and step that is at most three de-quantizations: one without scales for the scales'
gradient (1.), and in the V step the previous and the new weight (3.; the new one also serves
4. and the buffer pull). P-only steps de-quantize once in 4.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..inference import QuantizedLinear
from ..ops import codebook_gradient, codeword_rows, dequantize, weight_gradients
from .config import PVConfig
from .reencode import reencode_codes
from .sharding import RowShard, assign, is_sharded, local, local_bytes, sharded_like

ROLE_NON_QUANTIZED = "non_quantized"
ROLE_CODEBOOKS_AND_SCALES = "codebooks_and_scales"
ROLE_CODES = "codes"


def _norm(tensor: torch.Tensor) -> float:
    """The L2 norm of ``tensor``, summed in float64 (of the whole tensor when it is sharded: the local
    sums of squares are added over the processes), so that it hardly depends on how it is split."""
    squares = torch.linalg.vector_norm(local(tensor).detach(), dtype=torch.float64).square()
    if is_sharded(tensor):
        dist.all_reduce(squares, group=tensor.device_mesh.get_group())
    return math.sqrt(float(squares))


class AdamLamb(torch.optim.Optimizer):
    """Adam or LAMB with per-group settings, as upstream AQLM's ``ConfigurableAdamW``.

    Per tensor and step ``t``: ``m = lerp(m, g, 1 - beta1)`` (or ``m = g`` when ``beta1 == 0``),
    ``v = lerp(v, g^2, 1 - beta2)`` (optionally its running maximum with ``amsgrad``),
    ``u = m / (sqrt(v) + eps)``; the step is ``-lr * u``, times ``sqrt(1 - beta2^t) / (1 - beta1^t)``
    when ``debias`` (default: True for Adam, False for LAMB), times ``||p|| / ||u||`` for LAMB (norms
    summed in float64, of whole tensors when FSDP shards them).
    Adam's weight decay is decoupled (``p *= 1 - lr * wd``); LAMB's is added to ``u``.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        debias: Optional[bool] = None,
        amsgrad: bool = False,
        lamb: bool = False,
    ):
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, debias=debias, amsgrad=amsgrad, lamb=lamb
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter that has a gradient."""
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            weight_decay, lamb = group["weight_decay"], group["lamb"]
            debias = group["debias"] if group["debias"] is not None else not lamb
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = param.grad.float()
                state = self.state[param]
                state["step"] = state.get("step", 0) + 1
                step = state["step"]
                if not lamb and weight_decay:
                    param.mul_(1 - lr * weight_decay)
                if beta1 != 0:
                    if "exp_avg" not in state:
                        state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    update = state["exp_avg"].clone()
                else:
                    update = grad.clone()
                if "exp_avg_sq" not in state:
                    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                second = state["exp_avg_sq"]
                if beta2 == 0:
                    second.copy_(grad.square())
                else:
                    second.lerp_(grad.square(), 1 - beta2)
                if group["amsgrad"]:
                    if "max_exp_avg_sq" not in state:
                        state["max_exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)
                    torch.maximum(state["max_exp_avg_sq"], second, out=state["max_exp_avg_sq"])
                    second = state["max_exp_avg_sq"]
                update.div_(second.sqrt().add_(eps))
                if lamb and weight_decay:
                    update.add_(param.float(), alpha=weight_decay)
                scale = -lr
                if debias:
                    first_correction = 1.0 / (1 - beta1**step) if beta1 != 0 else 1.0
                    second_correction = math.sqrt(1 - beta2**step) if beta2 != 0 else 1.0
                    scale *= first_correction * second_correction
                if lamb:
                    weight_norm, update_norm = _norm(param), _norm(update)
                    if weight_norm > 0 and update_norm > 0:
                        scale *= weight_norm / update_norm
                param.add_(update.to(param.dtype), alpha=scale)
        return loss


@dataclass
class QuantizedEntry:
    """One quantized layer under training.

    ``linear`` sits in the student model and holds the de-quantized weight (float32) that the
    forward pass uses; ``quantized`` is the master: packed codes and float32 codebooks/scales.
    Their biases are the same parameter (until FSDP replaces the linear's). ``buffer`` is the
    straight-through buffer (or None). With FSDP (:mod:`aqlm.pv_tuning.sharding`) the weight, its
    gradient and the buffer are sharded by rows, and the master stays whole.
    """

    name: str
    linear: nn.Linear
    quantized: QuantizedLinear
    buffer: Optional[nn.Parameter] = None

    @property
    def shard(self) -> RowShard:
        """The weight rows this process holds (all of them without FSDP)."""
        return RowShard.of(self.linear.weight)

    def quantized_weight(self) -> torch.Tensor:
        """The current de-quantized weight in float32: the rows this process holds (all without FSDP)."""
        q = self.quantized
        groups = self.shard.in_groups(q.codebooks.shape[2]).rows
        return dequantize(q.codes[groups], q.codebooks.detach(), q.scales.detach()[groups]).float()

    def continuous_gradients(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gradients of codebooks and scales from the weight's gradient ``grad``.

        With FSDP ``grad`` holds this process's rows: the scales' gradient is gathered by rows, and
        the codebooks' sums run through the processes in rank order (each continues the sums of the
        rows above its own, :func:`aqlm.ops.codebook_gradient`), so both are those of one process.
        """
        q = self.quantized
        shard = self.shard
        groups = shard.in_groups(q.codebooks.shape[2])
        codes, scales = q.codes[groups.rows], q.scales.detach()[groups.rows]
        _, grad_scales = weight_gradients(local(grad), codes, q.codebooks, scales, False, True)
        rows = codeword_rows(codes, q.codebooks.shape[1])
        if not groups.distributed:
            return codebook_gradient(local(grad), rows, scales, q.codebooks.shape), grad_scales
        rank, last = dist.get_rank(), dist.get_world_size() - 1
        sums = torch.zeros(q.codebooks.shape)
        if rank > 0:
            dist.recv(sums, src=rank - 1)
        codebook_gradient(local(grad), rows, scales, q.codebooks.shape, into=sums)
        if rank < last:
            dist.send(sums, dst=rank + 1)
        dist.broadcast(sums, src=last)
        return sums, groups.gather(grad_scales)


@dataclass
class StepStats:
    """What the V step did: code groups changed and allowed to change, over all layers."""

    changed_groups: int = 0
    allowed_groups: int = 0
    total_groups: int = 0

    @property
    def changed_fraction(self) -> float:
        """Fraction of all code groups with at least one code changed in this step."""
        return self.changed_groups / max(self.total_groups, 1)


class PVOptimizer:
    """PV-Tuning's optimizer over a student whose quantized layers are trained in de-quantized form.

    V-step variants, by ``config.delta_decay`` (upstream ``StraightThroughAdamW``):

    - ``delta_decay == 1`` (direct): the de-quantized weight ``W`` itself is optimized with
      ``code_lr``; after the step, codes are re-encoded towards the updated ``W`` and ``W`` is
      reset to the new quantized weight. No straight-through buffers exist.
    - ``delta_decay == 0`` (straight-through): a float32 buffer ``B`` per layer, initialised to the
      quantized weight, receives ``dL/dW`` as its gradient and is updated by the optimizer; codes
      are re-encoded towards ``B``; ``B`` keeps accumulating updates across steps.
    - ``0 < delta_decay < 1`` (penalized straight-through): as above, but after re-encoding
      ``B = delta_decay * Q(new codes) + (1 - delta_decay) * B``.

    In every mode the codes may change in at most ``max_code_change_per_step`` of the code groups of
    a layer per step (optionally bounded further by ``code_trust_ratio``). With
    ``update_codes=False`` this is plain P-tuning (codebooks/scales and optionally the other
    parameters) with the codes frozen.
    """

    def __init__(self, entries: list[QuantizedEntry], non_quantized: dict[str, nn.Parameter], config: PVConfig):
        if not entries:
            raise ValueError("the student has no quantized layers to train")
        self.entries = sorted(entries, key=lambda entry: entry.name)
        self.config = config
        self.generator = torch.Generator().manual_seed(config.seed * 1000003 + 17)
        needs_weight_grad = config.update_codes or config.update_codebooks_and_scales
        for entry in self.entries:
            q = entry.quantized
            for name in ("codebooks", "scales"):
                parameter = getattr(q, name)
                setattr(q, name, nn.Parameter(parameter.detach().float().contiguous(),
                                              requires_grad=config.update_codebooks_and_scales))
            with torch.no_grad():
                local(entry.linear.weight).copy_(entry.quantized_weight())
            entry.linear.weight.requires_grad_(needs_weight_grad)
            entry.buffer = None
            if config.straight_through:
                entry.buffer = nn.Parameter(sharded_like(entry.linear.weight, entry.quantized_weight()))
        for parameter in non_quantized.values():
            parameter.requires_grad_(config.update_non_quantized_parameters)
        self.non_quantized = non_quantized
        self.fsdp = any(is_sharded(entry.linear.weight) for entry in self.entries)

        common = dict(eps=config.eps, weight_decay=config.weight_decay, debias=config.debias,
                      amsgrad=config.amsgrad, lamb=config.lamb)
        continuous = dict(lr=config.lr, betas=(config.beta1, config.beta2), **common)
        groups = []
        if config.update_non_quantized_parameters and non_quantized:
            groups.append(dict(params=list(non_quantized.values()), role=ROLE_NON_QUANTIZED, **continuous))
        if config.update_codebooks_and_scales:
            params = [p for entry in self.entries for p in (entry.quantized.codebooks, entry.quantized.scales)]
            groups.append(dict(params=params, role=ROLE_CODEBOOKS_AND_SCALES, **continuous))
        if config.update_codes:
            params = [entry.buffer if config.straight_through else entry.linear.weight for entry in self.entries]
            groups.append(dict(params=params, role=ROLE_CODES, lr=config.code_lr,
                               betas=(config.code_beta1, config.code_beta2), **common))
        if not groups:
            raise ValueError("nothing to train: the student has no non-quantized parameters and codes, codebooks "
                             "and scales are frozen")
        self.sharded = config.shard_optimizer_state and dist.is_available() and dist.is_initialized() \
            and dist.get_world_size() > 1
        # ZeRO stage 1: each process steps its share of the tensors and broadcasts them; identical
        # updates (elementwise per tensor), so the same result as one optimizer holding everything
        if self.sharded:
            from torch.distributed.optim import ZeroRedundancyOptimizer  # imported on use: it loads TorchScript

            self.optimizer = ZeroRedundancyOptimizer(groups, optimizer_class=AdamLamb)
        else:
            self.optimizer = AdamLamb(groups)

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        """The straight-through buffers by layer name (empty unless ``delta_decay < 1`` with code updates)."""
        return {entry.name: entry.buffer for entry in self.entries if entry.buffer is not None}

    def zero_grad(self) -> None:
        """Drop all gradients, including those of the de-quantized weights."""
        self.optimizer.zero_grad(set_to_none=True)
        for entry in self.entries:
            entry.linear.weight.grad = None
            entry.quantized.codebooks.grad = None
            entry.quantized.scales.grad = None
            if entry.buffer is not None:
                entry.buffer.grad = None

    @torch.no_grad()
    def step(self) -> StepStats:
        """One PV step (see the class docstring); returns the V step's statistics."""
        config = self.config
        for entry in self.entries:
            grad = entry.linear.weight.grad
            if grad is None:
                if config.update_codes or config.update_codebooks_and_scales:
                    raise RuntimeError(f"{entry.name} received no gradient: run a backward pass before step()")
                continue
            q = entry.quantized
            if config.update_codebooks_and_scales:
                q.codebooks.grad, q.scales.grad = entry.continuous_gradients(grad)
            if entry.buffer is not None:
                entry.buffer.grad = grad.float()
        self.optimizer.step()

        stats = StepStats()
        if config.update_codes:
            for entry in self.entries:
                target = entry.buffer if entry.buffer is not None else entry.linear.weight
                q = entry.quantized
                result = reencode_codes(
                    local(target),
                    q.codes,
                    q.codebooks,
                    q.scales,
                    max_change_fraction=config.max_code_change_per_step,
                    selection_temperature=config.code_selection_temperature,
                    trust_ratio=config.code_trust_ratio,
                    beam_size=config.beam_size,
                    generator=self.generator,
                    num_threads=config.num_threads,
                    shard=entry.shard,
                )
                q.codes.copy_(result.codes)
                stats.changed_groups += result.changed_groups
                stats.allowed_groups += result.allowed_groups
                stats.total_groups += result.total_groups
                if entry.buffer is not None and config.delta_decay != 0:
                    local(entry.buffer).mul_(1 - config.delta_decay).add_(result.weight, alpha=config.delta_decay)
                local(entry.linear.weight).copy_(result.weight)
        else:
            stats.total_groups = sum(entry.quantized.codes.shape[0] * entry.quantized.codes.shape[1]
                                     for entry in self.entries)
            for entry in self.entries:
                local(entry.linear.weight).copy_(entry.quantized_weight())
        return stats

    def state_bytes(self) -> int:
        """Bytes of optimizer moments this process holds (its share when the state or the model is sharded)."""
        optimizer = self.optimizer.optim if self.sharded else self.optimizer
        return local_bytes(t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor))

    def gather_state(self) -> None:
        """With sharded state, collect every process's share on rank 0 so that :meth:`state_dict`
        can be called there; every process must call it at the same point. No-op otherwise."""
        if self.sharded:
            self.optimizer.consolidate_state_dict(to=0)

    def state_dict(self) -> dict:
        """Optimizer statistics, straight-through buffers and the code-selection generator state, all
        whole (with sharded state: on rank 0 only, after :meth:`gather_state` on every process; with
        FSDP see :meth:`sharded_state`)."""
        if self.fsdp:
            raise RuntimeError("with FSDP the state is saved sharded: use sharded_state()")
        return {
            "optimizer": self.optimizer.state_dict(),
            "buffers": {name: buffer.detach().clone() for name, buffer in self.buffers.items()},
            "generator": self.generator.get_state(),
        }

    def sharded_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """With FSDP: the :meth:`state_dict` without gathering, split into the small part and a flat dict
        of the moments and buffers (sharded like their tensors), for ``torch.distributed.checkpoint``.

        :func:`join_sharded_state` puts the two back together (with whole or sharded tensors).
        """
        state = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars = {}
        for index, values in state["state"].items():
            scalars[index] = {key: value for key, value in values.items() if not isinstance(value, torch.Tensor)}
            tensors.update({f"optimizer.{index}.{key}": value.detach() for key, value in values.items()
                            if isinstance(value, torch.Tensor)})
        tensors.update({f"buffer.{name}": buffer.detach() for name, buffer in self.buffers.items()})
        small = {"param_groups": state["param_groups"], "scalars": scalars, "buffers": sorted(self.buffers),
                 "generator": self.generator.get_state()}
        return small, tensors

    def sharded_tensor_targets(self, names: Iterable[str], whole_tensors: bool) -> dict[str, torch.Tensor]:
        """Empty tensors to load the moments and buffers named ``names`` of a :meth:`sharded_state` into:
        laid out like their parameters (sharded with FSDP) or, with ``whole_tensors``, whole."""
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        buffers = self.buffers
        targets = {}
        for name in names:
            kind, _, rest = name.partition(".")
            reference = buffers[rest] if kind == "buffer" else parameters[int(rest.partition(".")[0])]
            targets[name] = torch.zeros(reference.shape) if whole_tensors or not is_sharded(reference) \
                else torch.zeros_like(reference, dtype=torch.float32)
        return targets

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (for the same model and config)."""
        buffers = self.buffers
        saved = state["buffers"]
        if set(saved) != set(buffers):
            raise ValueError(
                f"checkpoint has straight-through buffers for {len(saved)} layers, this run needs {len(buffers)}"
            )
        for name, buffer in buffers.items():
            assign(buffer, saved[name])
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # with FSDP: whole moments -> this process's rows
            for parameter in group["params"]:
                tensors = self.optimizer.state.get(parameter, {}) if is_sharded(parameter) else {}
                for key, value in tensors.items():
                    if isinstance(value, torch.Tensor) and not is_sharded(value):
                        tensors[key] = sharded_like(parameter, value[RowShard.of(parameter).rows])
        self.generator.set_state(state["generator"])


def join_sharded_state(small: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The :meth:`PVOptimizer.state_dict` form of a :meth:`PVOptimizer.sharded_state` (tensors whole or sharded)."""
    state = {index: dict(values) for index, values in small["scalars"].items()}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "optimizer":
            index, _, key = rest.partition(".")
            state[int(index)][key] = tensor
    return {
        "optimizer": {"state": state, "param_groups": small["param_groups"]},
        "buffers": {name: tensors[f"buffer.{name}"] for name in small["buffers"]},
        "generator": small["generator"],
    }
