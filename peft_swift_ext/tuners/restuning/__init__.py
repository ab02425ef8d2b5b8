from ...core.registry import add_peft_type, register_tuner

add_peft_type("restuning")

from .config import ResTuningConfig  # noqa: E402  (the PeftType member must exist first)
from .model import ResTuningModel  # noqa: E402

register_tuner("restuning", ResTuningConfig, ResTuningModel, swift_types=("RESTUNING",))

__all__ = ["ResTuningConfig", "ResTuningModel"]
