from ...core.registry import add_peft_type, register_tuner

add_peft_type("llamapro")

from .config import LlamaProConfig  # noqa: E402  (the PeftType member must exist first)
from .model import LlamaProModel  # noqa: E402

register_tuner("llamapro", LlamaProConfig, LlamaProModel, swift_types=("LLAMAPRO",))

__all__ = ["LlamaProConfig", "LlamaProModel"]
