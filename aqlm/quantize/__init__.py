"""AQLM calibration: one layer (:mod:`.layer`), block fine-tuning (:mod:`.finetune`) and whole models (:mod:`.model`)."""
from .finetune import FinetuneConfig, finetune_block
from .layer import LayerConfig, LayerResult, quantize_weight
from .model import QuantizationReport, QuantizeConfig, quantize_model

__all__ = [
    "FinetuneConfig",
    "LayerConfig",
    "LayerResult",
    "QuantizationReport",
    "QuantizeConfig",
    "finetune_block",
    "quantize_model",
    "quantize_weight",
]
