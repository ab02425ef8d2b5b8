"""SWIFT-layout LoRA / LoRA+ checkpoints -> folders plain PEFT loads (``Swift.save_to_peft_format``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import PeftType

from ..core.files import (
    CONFIG_NAME,
    EXTRA_STATES_DIR,
    adapter_subfolder,
    atomic_directory,
    list_adapter_folders,
    read_json,
    read_weights,
    write_adapter_files,
)
from ..core.validators import check_field_types
from .configs import is_swift_native, lora_fields

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
            _, fields = lora_fields(config_dict)
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


_LORA_CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def swift_lora_key_to_peft(key: str, adapter_name: str) -> str:
    """Rewrite one SWIFT-layout LoRA key into PEFT's layout (adapter name out, ``base_model.model.`` in).

    Args:
        key: the key in a SWIFT-layout checkpoint.
        adapter_name: the adapter name the checkpoint keys carry.
    """
    for container in _LORA_CONTAINERS:
        key = key.replace(f".{container}.{adapter_name}.", f".{container}.")
        if key.endswith(f".{container}.{adapter_name}"):
            key = key[: -len(adapter_name) - 1]
    if not key.startswith("base_model.model."):
        key = "base_model.model." + key
    return key


def save_to_peft_format(ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Convert a SWIFT-layout checkpoint of LoRA adapters into a folder plain PEFT loads.

    Everything is checked before anything is written, and the output appears atomically.

    Args:
        ckpt_dir: the folder written by ``SwiftModel.save_pretrained`` (or ms-swift).
        output_dir: where to write; adapter ``default`` goes to its root, others into sub-folders.
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist")
    if (ckpt / EXTRA_STATES_DIR).exists():
        raise ValueError(f"{ckpt / EXTRA_STATES_DIR}: extra trainable weights have no equivalent in PEFT's format")
    if (ckpt / CONFIG_NAME).is_file() and not list_adapter_folders(ckpt):
        raise ValueError(f"{ckpt} is already in PEFT's format (adapter_config.json at its root)")
    names = list_adapter_folders(ckpt)
    if not names:
        raise ValueError(f"{ckpt} holds no adapter folders (sub-folders with {CONFIG_NAME})")
    converted: dict[str, tuple[dict, dict[str, torch.Tensor]]] = {}
    for name in names:
        folder = adapter_subfolder(ckpt, name)
        config = to_peft_lora_config(read_json(folder / CONFIG_NAME), folder / CONFIG_NAME)
        weights = {swift_lora_key_to_peft(key, name): value for key, value in read_weights(folder).items()}
        converted[name] = (config, weights)
    with atomic_directory(output_dir) as staging:
        for name, (config, weights) in converted.items():
            folder = staging if name == "default" else staging / name
            folder.mkdir(exist_ok=True)
            write_adapter_files(folder, config, weights, safe=True)
