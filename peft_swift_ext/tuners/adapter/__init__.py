from ...core.registry import add_peft_type, register_tuner

add_peft_type("adapter")

from .config import AdapterConfig  # noqa: E402  (the PeftType member must exist first)
from .model import AdapterModel  # noqa: E402

register_tuner("adapter", AdapterConfig, AdapterModel, swift_types=("ADAPTER",))

__all__ = ["AdapterConfig", "AdapterModel"]
