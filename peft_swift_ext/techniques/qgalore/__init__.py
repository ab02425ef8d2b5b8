"""Q-GaLore in plain torch: INT4 projections with lazy SVD refresh, low-precision moments, INT8 weights."""

from .optimizer import QGaLoreAdamW
from .projector import QGaLoreProjector
from .quantization import QuantizedTensor, dequantize, quantize

__all__ = ["QGaLoreAdamW", "QGaLoreProjector", "QuantizedTensor", "dequantize", "quantize"]
