from ...core.registry import add_peft_type, register_tuner

add_peft_type("longlora")

from .config import LongLoraConfig  # noqa: E402  (the PeftType member must exist first)
from .model import LongLoraModel  # noqa: E402

register_tuner("longlora", LongLoraConfig, LongLoraModel, swift_types=("longlora",))

__all__ = ["LongLoraConfig", "LongLoraModel"]
