from ...core.registry import add_peft_type, register_tuner

add_peft_type("loraplus")

from .config import LoraPlusConfig  # noqa: E402  (the PeftType member must exist first)
from .model import LoraPlusModel  # noqa: E402
from .optim import create_lora_plus_optimizer  # noqa: E402

register_tuner("loraplus", LoraPlusConfig, LoraPlusModel, swift_types=("LORA",))

__all__ = ["LoraPlusConfig", "LoraPlusModel", "create_lora_plus_optimizer"]
