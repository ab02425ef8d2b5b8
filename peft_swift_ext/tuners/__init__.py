"""The plugin tuners; importing this package registers each of them into PEFT."""

from .adapter import AdapterConfig, AdapterModel
from .lisa import LisaConfig, LisaModel
from .llamapro import LlamaProConfig, LlamaProModel
from .longlora import LongLoraConfig, LongLoraModel
from .lora_plus import LoraPlusConfig, LoraPlusModel, create_lora_plus_optimizer
from .neftune import NEFTuneConfig, NEFTuneModel
from .prompt import PromptConfig, PromptModel
from .restuning import ResTuningConfig, ResTuningModel
from .scedit import SCEditConfig, SCEditModel
from .side import SideConfig, SideModel

__all__ = [
    "AdapterConfig",
    "AdapterModel",
    "PromptConfig",
    "PromptModel",
    "SideConfig",
    "SideModel",
    "LisaConfig",
    "LisaModel",
    "LlamaProConfig",
    "LlamaProModel",
    "NEFTuneConfig",
    "NEFTuneModel",
    "LongLoraConfig",
    "LongLoraModel",
    "LoraPlusConfig",
    "LoraPlusModel",
    "create_lora_plus_optimizer",
    "ResTuningConfig",
    "ResTuningModel",
    "SCEditConfig",
    "SCEditModel",
]
