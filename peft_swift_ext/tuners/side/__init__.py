from ...core.registry import add_peft_type, register_tuner

add_peft_type("side")

from .config import SideConfig  # noqa: E402  (the PeftType member must exist first)
from .model import SideModel  # noqa: E402

register_tuner("side", SideConfig, SideModel, swift_types=("SIDE",))

__all__ = ["SideConfig", "SideModel"]
