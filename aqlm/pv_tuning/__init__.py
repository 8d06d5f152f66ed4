"""PV-Tuning (Malinovskii et al., NeurIPS 2024): fine-tune an AQLM model's codes, codebooks and scales.

The student (an AQLM checkpoint) is distilled from its dense teacher by minimising the KL
divergence between their next-token distributions. Each step is a P step (Adam/LAMB on the
continuous parameters: codebooks, scales and optionally the non-quantized parameters) and a V
step (the discrete codes are re-encoded by the C beam search towards a continuously updated
target, within a small subspace of code groups). See :class:`PVOptimizer` for the three V-step
variants selected by ``delta_decay`` and :func:`pv_tune` for the training loop.
"""
from .config import PVConfig
from .loss import Evaluation, distillation_loss_sum, evaluate_student
from .optim import AdamLamb, PVOptimizer, QuantizedEntry, StepStats
from .reencode import ReencodeResult, reencode_codes, select_code_groups
from .train import PVReport, check_compatible, dequantized_student, load_student, pv_tune, restore_quantized

__all__ = [
    "AdamLamb",
    "Evaluation",
    "PVConfig",
    "PVOptimizer",
    "PVReport",
    "QuantizedEntry",
    "ReencodeResult",
    "StepStats",
    "check_compatible",
    "dequantized_student",
    "distillation_loss_sum",
    "evaluate_student",
    "load_student",
    "pv_tune",
    "reencode_codes",
    "restore_quantized",
    "select_code_groups",
]
