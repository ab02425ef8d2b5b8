"""The whole base model at a checkpoint's root: full fine-tuning beside weightless adapters (NEFTune).

ms-swift writes it there when no adapter has weights (``base_model.save_pretrained(root)`` for a Hugging Face
model, else the state dict as ``adapter_model.safetensors``); this package does so whenever base weights train
that no adapter saves (docs/tuners/neftune.md). The order file records it (``"whole_model": true``) so that stale
model files left in a reused folder are never read; a checkpoint without that record (ms-swift's) is read when
its root holds model weights and is not itself a PEFT adapter folder.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import files
from ..core.paths import adapter_parameter_ids

if TYPE_CHECKING:  # annotations only: the model imports io, which imports this module
    from .model import SwiftModel

ORDER_KEY = "whole_model"
SAFE_NAME = "model.safetensors"
SAFE_INDEX_NAME = "model.safetensors.index.json"
# segments that wrappers insert into a base tensor's path: tuner layers' base_layer, modules_to_save's original_module
_WRAPPER_SEGMENTS = ("base_layer", "original_module")


def plain_path(key: str) -> str:
    """A base tensor's key in the plain model: the wrappers' ``base_layer`` / ``original_module`` segments dropped.

    Args:
        key: a state-dict key in a model with tuner layers.
    """
    return ".".join(part for part in key.split(".") if part not in _WRAPPER_SEGMENTS)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's own tensors (parameters and persistent buffers, no adapter's), by plain-model key.

    Args:
        model: the shared base model, with tuner layers in it.
    """
    adapters = adapter_parameter_ids(model) | _adapter_buffer_ids(model)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in adapters:
            state.setdefault(plain_path(key), tensor)
    return state


def _adapter_buffer_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if hasattr(module, "base_layer") or hasattr(module, "original_module"):
            for name, child in module.named_children():
                if name not in _WRAPPER_SEGMENTS:
                    ids |= {id(buffer) for buffer in child.buffers()}
    return ids


def untracked_trainable(model: SwiftModel) -> list[str]:
    """Plain-model paths of the base parameters that train but that no adapter's checkpoint holds."""
    owned = adapter_parameter_ids(model.model)
    for name in model.adapters:
        tuner = model.in_place_tuner(name)
        if tuner is not None:  # LISA: the layers it may train, and those it saves
            owned |= {id(p) for p in tuner.trainable_parameters(all_candidates=True)}
            owned |= {id(p) for p in tuner.saved_tensors().values()}
    return [
        plain_path(name)
        for name, param in model.model.named_parameters()
        if param.requires_grad and id(param) not in owned
    ]


def write(model: SwiftModel, folder: Path) -> list[str]:
    """Write the whole base model (safetensors) into the empty ``folder``; return the names of the files written.

    A Hugging Face model saves itself (config, generation config, weights or shards and their index), keeping its
    state-dict key names (so that a model whose weights transformers converts on loading reads them back here);
    any other model's state dict goes to ``model.safetensors``.
    """
    state = {key: tensor.detach() for key, tensor in base_state_dict(model.model).items()}
    save_pretrained = getattr(model.model, "save_pretrained", None)
    if callable(save_pretrained):
        options = {"state_dict": state}
        if "save_original_format" in inspect.signature(save_pretrained).parameters:
            options["save_original_format"] = False
        save_pretrained(str(folder), **options)
    else:
        seen: set[int] = set()
        tensors = {}
        for key, tensor in state.items():  # safetensors refuses shared tensors: copy the repeats
            tensors[key] = tensor.clone().contiguous() if tensor.data_ptr() in seen else tensor.contiguous()
            seen.add(tensor.data_ptr())
        save_file(tensors, str(folder / SAFE_NAME), metadata={"format": "pt"})
    return sorted(path.name for path in folder.iterdir())


def read(root: Path) -> tuple[dict[str, torch.Tensor], Path] | None:
    """The whole base model saved at the root of a checkpoint, with the file it came from; None when there is none.

    Args:
        root: the checkpoint folder.

    Raises:
        FileNotFoundError: the order file records a whole model, but no model weights are at the root.
        ValueError: a weights file or shard index cannot be read safely.
    """
    marker = root / files.ORDER_FILE
    recorded = (files.read_json(marker) if marker.is_file() else {}).get(ORDER_KEY)
    if recorded is False:
        return None
    found = _read_files(root, root_is_adapter=(root / files.CONFIG_NAME).is_file() and recorded is not True)
    if found is None and recorded is True:
        raise FileNotFoundError(f"{marker} records the whole base model, but {root} holds no {SAFE_NAME}")
    return found


def _read_files(root: Path, root_is_adapter: bool) -> tuple[dict[str, torch.Tensor], Path] | None:
    if (root / SAFE_INDEX_NAME).is_file():
        shards = files.read_json(root / SAFE_INDEX_NAME).get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(name, str) for name in shards.values()):
            raise ValueError(f"{root / SAFE_INDEX_NAME} has no weight_map of tensor names to shard files")
        weights: dict[str, torch.Tensor] = {}
        for shard in sorted(set(shards.values())):
            path = (root / shard).resolve()
            if path.parent != root.resolve():
                raise ValueError(
                    f"the shard {shard!r} named in {root / SAFE_INDEX_NAME} is outside the checkpoint directory"
                )
            weights.update(_read_safe(path))
        return weights, root / SAFE_INDEX_NAME
    if (root / SAFE_NAME).is_file():
        return _read_safe(root / SAFE_NAME), root / SAFE_NAME
    # ms-swift writes a model that is not a Hugging Face one under the adapters' file name
    if not root_is_adapter and (root / files.SAFE_WEIGHTS_NAME).is_file():
        return _read_safe(root / files.SAFE_WEIGHTS_NAME), root / files.SAFE_WEIGHTS_NAME
    return None


def _read_safe(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path} is not a readable safetensors file: {error}") from None


def check(model: SwiftModel, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Raise unless ``weights`` is the whole of the model's base: every key known, every shape equal, every base
    tensor present (a tensor tied to a present one, such as a tied output head, may be left out). ``weights`` are
    by plain-model key; ``source`` is named in the error.
    """
    state = base_state_dict(model.model)
    unexpected = [key for key in weights if key not in state]
    mismatched = [
        f"{key}: checkpoint {tuple(weights[key].shape)} vs model {tuple(state[key].shape)}"
        for key in weights
        if key in state and tuple(weights[key].shape) != tuple(state[key].shape)
    ]
    present = {id(state[key]) for key in weights if key in state}
    missing = [key for key, tensor in state.items() if key not in weights and id(tensor) not in present]
    if unexpected or mismatched or missing:
        found = (("unexpected", unexpected), ("mismatched", mismatched), ("missing", missing))
        raise ValueError(
            f"{source} holds the whole base model, but it does not fit this model: "
            + "; ".join(f"{label} keys: {files.preview_keys(keys)}" for label, keys in found if keys)
        )


def load(model: SwiftModel, weights: dict[str, torch.Tensor]) -> None:
    """Copy the whole-model ``weights`` (checked with :func:`check`) into the base model's own tensors."""
    state = base_state_dict(model.model)
    with torch.no_grad():
        for key, value in weights.items():
            state[key].copy_(value.to(state[key].dtype))


def is_base_state(model: SwiftModel, state_dict: dict[str, torch.Tensor]) -> bool:
    """Whether ``state_dict`` is (part of) the plain base model: every key a plain-model key of the base, none of
    the wrapping model's own. The Hugging Face ``Trainer`` hands over such a dict when it resumes a checkpoint whose
    root holds the whole model (it reads the root's ``model.safetensors`` itself and calls ``load_state_dict``).

    Args:
        model: the model being loaded into.
        state_dict: the tensors offered to ``model.load_state_dict``.
    """
    return bool(state_dict) and set(state_dict) <= base_state_dict(model.model).keys()
