"""Q-GaLore in plain torch: INT4 projections with lazy SVD refresh, low-precision moments, INT8 weights."""

from .int8_linear import Int8WeightLinear, quantize_linear_weights
from .optimizer import QGaLoreAdamW
from .projector import QGaLoreProjector
from .quantization import QuantizedTensor, dequantize, quantize

__all__ = [
    "Int8WeightLinear",
    "QGaLoreAdamW",
    "QGaLoreProjector",
    "QuantizedTensor",
    "dequantize",
    "quantize",
    "quantize_linear_weights",
]
