from ...core.registry import add_peft_type, register_tuner

add_peft_type("prompt")

from .config import PromptConfig  # noqa: E402  (the PeftType member must exist first)
from .model import PromptModel  # noqa: E402

register_tuner("prompt", PromptConfig, PromptModel, swift_types=("PROMPT",))

__all__ = ["PromptConfig", "PromptModel"]
