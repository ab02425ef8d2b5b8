from ...core.registry import add_peft_type, register_tuner

add_peft_type("scedit")

from .config import SCEditConfig  # noqa: E402  (the PeftType member must exist first)
from .model import SCEditModel  # noqa: E402

register_tuner("scedit", SCEditConfig, SCEditModel, swift_types=("SCETuning",))

__all__ = ["SCEditConfig", "SCEditModel"]
