from ...core.registry import add_peft_type, register_tuner

add_peft_type("neftune")

from .config import NEFTuneConfig  # noqa: E402  (the PeftType member must exist first)
from .model import NEFTuneModel  # noqa: E402

register_tuner("neftune", NEFTuneConfig, NEFTuneModel, swift_types=("neftune",))

__all__ = ["NEFTuneConfig", "NEFTuneModel"]
