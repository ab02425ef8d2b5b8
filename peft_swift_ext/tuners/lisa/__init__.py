"""LISA as a registered PEFT method: ``get_peft_model(model, LisaConfig(...))``."""

from ...core.registry import add_peft_type, register_tuner

add_peft_type("lisa")

from .config import LisaConfig  # noqa: E402  (the PeftType member must exist first)
from .model import LisaModel  # noqa: E402

register_tuner("lisa", LisaConfig, LisaModel)

__all__ = ["LisaConfig", "LisaModel"]
