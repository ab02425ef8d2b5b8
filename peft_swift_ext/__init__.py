"""ModelScope SWIFT's tuners as native PEFT methods, and SWIFT's ``Swift`` / ``SwiftModel`` API.

Importing the package registers every tuner into PEFT's registry, so ``get_peft_model``,
``PeftModel.from_pretrained`` and friends accept this package's configs.
"""

from .core.registry import TUNERS, register_tuner
from .swift import Swift, SwiftModel
from .tuners import (
    AdapterConfig,
    LisaConfig,
    LisaModel,
    LlamaProConfig,
    LlamaProModel,
    LongLoraConfig,
    LongLoraModel,
    LoraPlusConfig,
    LoraPlusModel,
    NEFTuneConfig,
    NEFTuneModel,
    PromptConfig,
    ResTuningConfig,
    SCEditConfig,
    SideConfig,
    create_lora_plus_optimizer,
)

__version__ = "0.1.0"

__all__ = [
    "TUNERS",
    "AdapterConfig",
    "PromptConfig",
    "SideConfig",
    "LisaConfig",
    "LisaModel",
    "LlamaProConfig",
    "LlamaProModel",
    "LongLoraConfig",
    "LongLoraModel",
    "NEFTuneConfig",
    "NEFTuneModel",
    "LoraPlusConfig",
    "LoraPlusModel",
    "Swift",
    "SwiftModel",
    "create_lora_plus_optimizer",
    "register_tuner",
    "ResTuningConfig",
    "SCEditConfig",
]
