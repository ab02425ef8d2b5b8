"""Training-memory techniques from SWIFT: LISA, GaLore, Q-GaLore, Liger Kernel, a chunked loss, unsloth.

They are not adapters: they make full or PEFT training cheaper, and work with plain transformers models,
`PeftModel` and `SwiftModel`. Optional packages (galore-torch, liger-kernel, unsloth) are imported only when
the function that needs them is called.
"""

from ..core.decoder_layers import find_decoder_layers
from ..core.unwrap import unwrap_model
from .chunked_ce import ChunkedLinearCrossEntropyLoss, causal_lm_chunked_loss, chunked_linear_cross_entropy
from .galore import create_galore_optimizer, select_galore_parameters
from .layerwise import create_layerwise_optimizer
from .liger import LigerPatch, apply_liger_kernel
from .lisa import LisaCallback, LisaConfig, LisaScheduler
from .qgalore import Int8WeightLinear, QGaLoreAdamW, QGaLoreProjector, quantize_linear_weights
from .unsloth import load_with_unsloth

__all__ = [
    "ChunkedLinearCrossEntropyLoss",
    "Int8WeightLinear",
    "LigerPatch",
    "LisaCallback",
    "LisaConfig",
    "LisaScheduler",
    "QGaLoreAdamW",
    "QGaLoreProjector",
    "apply_liger_kernel",
    "causal_lm_chunked_loss",
    "chunked_linear_cross_entropy",
    "create_galore_optimizer",
    "create_layerwise_optimizer",
    "find_decoder_layers",
    "load_with_unsloth",
    "quantize_linear_weights",
    "select_galore_parameters",
    "unwrap_model",
]
