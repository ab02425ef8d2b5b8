"""Loading checkpoint folders into a SwiftModel: discover, read and check everything, then apply."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftConfig

from ..registry import spec_for_swift_type
from . import checkpoint
from .model import SwiftModel


@dataclass
class PlannedAdapter:
    """One adapter read from disk and checked, waiting to be injected."""

    saved_name: str
    new_name: str
    config: PeftConfig
    weights: dict[str, torch.Tensor]
    source: Path


def discover_adapters(root: Path) -> dict[str, Path]:
    """Saved adapter name -> folder: PEFT's root adapter (``default``) and every adapter sub-folder."""
    found: dict[str, Path] = {}
    if (root / checkpoint.CONFIG_NAME).is_file():
        found["default"] = root
    for name in checkpoint.list_adapter_folders(root):
        if name in found:
            raise ValueError(f"{root} has both a root adapter and a sub-folder named {name!r}")
        found[name] = checkpoint.adapter_subfolder(root, name)
    if not found:
        raise ValueError(f"{root} holds no adapter ({checkpoint.CONFIG_NAME} at its root or in sub-folders)")
    marker = root / checkpoint.ROOT_MARKER
    order = checkpoint.read_json(marker).get("adapter_order", []) if marker.is_file() else []
    rank = {name: index for index, name in enumerate(order) if isinstance(name, str)}
    return dict(sorted(found.items(), key=lambda item: rank.get(item[0], len(rank))))


def select_adapters(found: dict[str, Path], adapter_name) -> dict[str, str]:
    """Saved name -> name to load under, from SWIFT's ``adapter_name`` argument (None, str, list or dict)."""
    if adapter_name is None:
        wanted = {name: name for name in found}
    elif isinstance(adapter_name, str):
        wanted = {adapter_name: adapter_name}
    elif isinstance(adapter_name, dict):
        wanted = dict(adapter_name)
    elif isinstance(adapter_name, (list, tuple)):
        wanted = {name: name for name in adapter_name}
    else:
        raise TypeError(f"adapter_name must be None, a str, a list or a dict, got {type(adapter_name).__name__}")
    missing = [name for name in wanted if name not in found]
    if missing:
        raise ValueError(f"adapter(s) {missing} not found in the checkpoint; it holds: {sorted(found)}")
    for new_name in wanted.values():
        checkpoint.check_adapter_name(new_name)
    return wanted


def read_adapter(
    folder: Path, saved_name: str, new_name: str, is_trainable: bool, model: torch.nn.Module
) -> PlannedAdapter:
    """Read one adapter folder, translating ms-swift's own formats, without changing ``model``."""
    config_file = folder / checkpoint.CONFIG_NAME
    config_dict = checkpoint.read_json(config_file)
    config = checkpoint.config_from_dict(config_dict, config_file)
    config.inference_mode = not is_trainable
    weights = checkpoint.read_weights(folder)
    if checkpoint.is_swift_native(config_dict):
        spec = spec_for_swift_type(str(config_dict["swift_type"]))
        translate = getattr(spec.model_cls, "from_swift_state_dict", None)
        if translate is not None:
            weights = translate(weights, saved_name, config=config, model=model)
    return PlannedAdapter(saved_name, new_name, config, weights, folder)


def read_extra_states(root: Path) -> dict[str, torch.Tensor]:
    """SWIFT's extra trainable base weights (``extra_states/``), or nothing when absent."""
    if not (root / checkpoint.EXTRA_STATES_DIR).is_dir():
        return {}
    folder = (root / checkpoint.EXTRA_STATES_DIR).resolve()
    if folder.parent != root.resolve():
        raise ValueError(
            f"{root / checkpoint.EXTRA_STATES_DIR} resolves to {folder}, outside the checkpoint directory"
        )
    return checkpoint.read_weights(folder)


def check_extra_states(model: SwiftModel, extra: dict[str, torch.Tensor], source: Path) -> None:
    """Raise unless every tensor of a checkpoint's extra states has a parameter of the same shape in the model.

    Args:
        model: the model the states will be loaded into.
        extra: the saved tensors, by state-dict key.
        source: the file they came from (named in the error).
    """
    params = dict(model.base_model.state_dict(keep_vars=True))
    unexpected = [key for key in extra if key not in params]
    mismatched = [key for key in extra if key in params and params[key].shape != extra[key].shape]
    if unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit the model: unexpected keys {unexpected[:6]}, mismatched shapes {mismatched[:6]}"
        )


def load_into(model: SwiftModel, root: Path, adapter_name, is_trainable: bool, low_cpu_mem_usage: bool) -> None:
    """Load the selected adapters of ``root`` into ``model``; all or nothing."""
    found = discover_adapters(root)
    wanted = select_adapters(found, adapter_name)
    clashes = [new for new in wanted.values() if new in model.peft_config]
    if clashes:
        raise ValueError(f"adapter(s) {clashes} already exist in the model; pass a dict to load under new names")
    plan = [read_adapter(found[saved], saved, new, is_trainable, model.base_model) for saved, new in wanted.items()]
    extra = read_extra_states(root)
    if extra:
        check_extra_states(model, extra, root / checkpoint.EXTRA_STATES_DIR)
    added: list[str] = []
    # An in-place adapter (LISA) writes into the base weights, which a rollback cannot take back: its weights
    # are loaded last, once every other adapter has loaded (its own keys and shapes are checked before writing).
    in_place: list[PlannedAdapter] = []
    try:
        for item in plan:
            model.add_adapter(item.new_name, item.config, trainable=is_trainable, low_cpu_mem_usage=low_cpu_mem_usage)
            added.append(item.new_name)
            if model._in_place_tuner(item.new_name) is not None:
                in_place.append(item)
                continue
            model.load_adapter_weights(
                item.new_name, item.weights, str(item.source), item.saved_name, assign=low_cpu_mem_usage
            )
        for item in in_place:
            model.load_adapter_weights(item.new_name, item.weights, str(item.source), item.saved_name)
    except BaseException:
        for name in reversed(added):
            model._delete_adapter(name)
        raise
    if extra:
        model.base_model.load_state_dict(extra, strict=False)
