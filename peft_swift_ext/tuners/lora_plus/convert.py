"""Turning LoRA / LoRA+ adapter configs (ours, PEFT's or ms-swift's) into plain PEFT ``LoraConfig`` dicts."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig
from peft.utils import PeftType

from ...swift.checkpoint import check_field_types, is_swift_native
from .config import LoraPlusConfig

_LORA_PLUS_ONLY = ("loraplus_lr_ratio", "loraplus_lr_embedding")


def to_peft_lora_config(config_dict: dict, source: Path) -> dict:
    """A PEFT ``LoraConfig`` dict for one adapter, or ``ValueError`` if it is not LoRA or PEFT cannot express it.

    Args:
        config_dict: the adapter's ``adapter_config.json``.
        source: its path, for error messages.
    """
    if is_swift_native(config_dict):
        if str(config_dict["swift_type"]).upper() != "LORA":
            raise ValueError(f"{source}: only LoRA adapters convert to PEFT's format, not {config_dict['swift_type']}")
        try:
            _, fields = LoraPlusConfig.from_swift_dict(config_dict)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
    else:
        peft_type = str(config_dict.get("peft_type", "")).upper()
        if peft_type not in (PeftType.LORA.value, "LORAPLUS"):
            raise ValueError(f"{source}: only LoRA adapters convert to PEFT's format, not {peft_type or 'unknown'}")
        fields = dict(config_dict)
    fields = {k: v for k, v in fields.items() if k not in (*_LORA_PLUS_ONLY, "peft_type")}
    known = set(LoraConfig.__dataclass_fields__)
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{source}: options PEFT's LoraConfig cannot express: {unknown}")
    check_field_types(LoraConfig, fields, source)
    return LoraConfig(**fields).to_dict()
