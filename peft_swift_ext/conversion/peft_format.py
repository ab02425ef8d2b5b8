"""SWIFT-layout LoRA / LoRA+ checkpoints -> folders plain PEFT loads (``Swift.save_to_peft_format``)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import PeftType

from ..core import transactions
from ..core.files import (
    CONFIG_NAME,
    EXTRA_STATES_DIR,
    SAFE_WEIGHTS_NAME,
    adapter_subfolder,
    list_adapter_folders,
    read_json,
    read_weights,
    write_adapter_files,
    write_config,
    write_weights,
)
from .configs import checked_config, is_swift_native, lora_fields

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
    return checked_config(LoraConfig, fields, source).to_dict()


#: PEFT's per-adapter containers that a LoRA checkpoint holds: its keys carry the adapter name right after them.
_LORA_CONTAINERS = (
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    "token_adapter.trainable_tokens_delta",
)
#: Containers PEFT does not save (it rebuilds them from the base model): dropped from the converted file.
_UNSAVED_CONTAINERS = ("token_adapter.trainable_tokens_original",)


def swift_lora_key_to_peft(key: str, adapter_name: str) -> str | None:
    """Rewrite one SWIFT-layout LoRA key into PEFT's layout (adapter name out, ``base_model.model.`` in).

    The key is parsed, not searched: the adapter name is the segment right after a LoRA container, taken nearest
    the tensor's own name, so an adapter named like a module or tensor (``weight``, ``lora_A``) converts right.
    Keys without an adapter segment (``modules_to_save`` copies) keep their path. Returns None for tensors PEFT
    does not save. Raises ``ValueError`` for a key that names the adapter after an unknown container.
    """
    parts = key.split(".")
    for index in range(len(parts) - 1, 0, -1):
        if parts[index] != adapter_name:
            continue
        owner = ".".join(parts[:index])
        if any(owner == c or owner.endswith("." + c) for c in _UNSAVED_CONTAINERS):
            return None
        if any(owner == c or owner.endswith("." + c) for c in _LORA_CONTAINERS):
            key = ".".join(parts[:index] + parts[index + 1 :])
            break
        if parts[index - 1].startswith(("lora_", "token_adapter")):
            raise ValueError(f"key {key!r}: adapter {adapter_name!r} follows unknown container {parts[index - 1]!r}")
    return key if key.startswith("base_model.model.") else "base_model.model." + key


def peft_layout_targets(output: Path, names: list[str]) -> list[Path]:
    """The paths a conversion of adapters ``names`` into ``output`` writes: ``default`` at its root, the others as
    sub-folders."""
    paths = [output / name for name in names if name != "default"]
    if "default" in names:
        paths += [output / CONFIG_NAME, output / SAFE_WEIGHTS_NAME]
    return paths


def save_to_peft_format(ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike) -> None:
    """Convert a SWIFT-layout checkpoint of LoRA adapters into a folder plain PEFT loads.

    Everything is checked before anything is written. Only the converted adapters' entries of ``output_dir`` are
    replaced (crash-safely, as one unit); anything else there is kept, and an output that would overwrite the
    checkpoint being converted is refused.

    Args:
        ckpt_dir: the folder written by ``SwiftModel.save_pretrained`` (or ms-swift).
        output_dir: where to write; adapter ``default`` goes to its root, others into sub-folders.
    """
    ckpt = Path(ckpt_dir)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint directory {ckpt} does not exist")
    with transactions.reading(ckpt):
        converted = _read_lora_checkpoint(ckpt)
    output = Path(output_dir)
    source = ckpt.resolve()
    for target in peft_layout_targets(output, list(converted)):
        resolved = target.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise ValueError(
                f"save_to_peft_format would write {target}, which overlaps the checkpoint {ckpt} it converts; "
                "choose an output folder outside it"
            )
    with transactions.update(output) as staged:
        for name, (config, weights) in converted.items():
            if name == "default":
                write_config(staged.new_file(CONFIG_NAME), config)
                write_weights(staged.new_file(SAFE_WEIGHTS_NAME), weights, safe=True)
            else:
                write_adapter_files(staged.new_folder(name), config, weights, safe=True)


def _read_lora_checkpoint(ckpt: Path) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    if (ckpt / EXTRA_STATES_DIR).exists():
        raise ValueError(f"{ckpt / EXTRA_STATES_DIR}: extra trainable weights have no equivalent in PEFT's format")
    names = list_adapter_folders(ckpt)
    if (ckpt / CONFIG_NAME).is_file() and not names:
        raise ValueError(f"{ckpt} is already in PEFT's format (adapter_config.json at its root)")
    if not names:
        raise ValueError(f"{ckpt} holds no adapter folders (sub-folders with {CONFIG_NAME})")
    converted: dict[str, tuple[dict, dict[str, torch.Tensor]]] = {}
    for name in names:
        folder = adapter_subfolder(ckpt, name)
        config = to_peft_lora_config(read_json(folder / CONFIG_NAME), folder / CONFIG_NAME)
        weights: dict[str, torch.Tensor] = {}
        for key, value in read_weights(folder).items():
            try:
                peft_key = swift_lora_key_to_peft(key, name)
            except ValueError as error:
                raise ValueError(f"{folder}: {error}") from None
            if peft_key is None:
                continue
            if peft_key in weights:
                raise ValueError(f"{folder}: keys {key!r} and another both become {peft_key!r} in PEFT's layout")
            weights[peft_key] = value
        converted[name] = (config, weights)
    return converted
