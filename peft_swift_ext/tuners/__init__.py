"""The plugin tuners; importing this package registers each of them into PEFT."""

from .lora_plus import LoraPlusConfig, LoraPlusModel, create_lora_plus_optimizer

__all__ = ["LoraPlusConfig", "LoraPlusModel", "create_lora_plus_optimizer"]
