"""Reading and writing a SwiftModel's checkpoints: SWIFT's layout, PEFT's, and ms-swift's own formats.

Loading discovers, reads and checks everything before the model changes, then adds the adapters; a failure
removes whatever was added. Saving stages every adapter inside the checkpoint folder and switches them in as
one crash-safe unit (:mod:`~peft_swift_ext.core.transactions`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftConfig
from peft.utils import PeftType

from ..conversion import config_from_dict, is_swift_native, state_dict_from_swift
from ..core import files, transactions
from ..core.contract import InPlaceTuner
from ..core.keys import PEFT_KEY_PREFIX, Slot
from ..core.paths import canonical_path
from ..core.registry import spec_for_swift_type
from . import safeguards, whole_model

#: the file the HF Trainer writes into each checkpoint folder
TRAINER_STATE_NAME = "trainer_state.json"

if TYPE_CHECKING:  # annotations only: the model imports this module
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
    """Saved adapter name -> folder: PEFT's root adapter (``default``) and every adapter sub-folder.

    Args:
        root: the checkpoint folder; its order file (if any) gives the order the adapters were added in.
    """
    found: dict[str, Path] = {}
    if (root / files.CONFIG_NAME).is_file():
        found["default"] = root
    for name in files.list_adapter_folders(root):
        if name in found:
            raise ValueError(f"{root} has both a root adapter and a sub-folder named {name!r}")
        found[name] = files.adapter_subfolder(root, name)
    if not found:
        raise ValueError(f"{root} holds no adapter ({files.CONFIG_NAME} at its root or in sub-folders)")
    order, _ = read_order(root)
    rank = {name: index for index, name in enumerate(order)}
    return dict(sorted(found.items(), key=lambda item: rank.get(item[0], len(rank))))


def read_order(root: Path) -> tuple[list[str], list[str] | None]:
    """``(adapter order, active adapters)`` recorded in a checkpoint; the active list is None when not recorded."""
    marker = root / files.ORDER_FILE
    data = files.read_json(marker) if marker.is_file() else {}
    order = [name for name in data.get("adapter_order", []) if isinstance(name, str)]
    active = data.get("active_adapters")
    return order, [name for name in active if isinstance(name, str)] if isinstance(active, list) else None


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
        files.check_adapter_name(new_name)
    return wanted


def read_adapter(
    folder: Path, saved_name: str, new_name: str, is_trainable: bool, model: torch.nn.Module
) -> PlannedAdapter:
    """Read one adapter folder, translating ms-swift's own formats, without changing ``model``."""
    config_file = folder / files.CONFIG_NAME
    config_dict = files.read_json(config_file)
    config = config_from_dict(config_dict, config_file)
    config.inference_mode = not is_trainable
    spec = spec_for_swift_type(str(config_dict["swift_type"])) if is_swift_native(config_dict) else None
    # ms-swift writes no weights file for an adapter without weights (NEFTune)
    weightless = spec is not None and not getattr(spec.model_cls, "has_weights", True)
    no_file = not any((folder / name).is_file() for name in (files.SAFE_WEIGHTS_NAME, files.PICKLE_WEIGHTS_NAME))
    weights = {} if weightless and no_file else files.read_weights(folder)
    if spec is not None:
        weights = state_dict_from_swift(spec.name, weights, saved_name, config, model)
    return PlannedAdapter(saved_name, new_name, config, weights, folder)


def read_extra_states(root: Path) -> dict[str, torch.Tensor]:
    """SWIFT's extra trainable base weights (``extra_states/``), or nothing when absent."""
    if not (root / files.EXTRA_STATES_DIR).is_dir():
        return {}
    folder = (root / files.EXTRA_STATES_DIR).resolve()
    if folder.parent != root.resolve():
        raise ValueError(f"{root / files.EXTRA_STATES_DIR} resolves to {folder}, outside the checkpoint directory")
    return files.read_weights(folder)


def extra_state_keys(model: SwiftModel, extra: dict[str, torch.Tensor], source: Path) -> dict[str, str]:
    """Checkpoint key -> the model's current key for every tensor of a checkpoint's extra states; raises first.

    Keys are matched without ``base_layer`` segments: an adapter that wraps the module (now or in the checkpoint's
    model) moves its weights under ``base_layer``, and a key compared as written would miss them.

    Args:
        model: the model the states go into, as it is now (call again after injecting adapters).
        extra: the saved tensors, by state-dict key.
        source: the file they came from (named in the error).
    """
    state = model.model.state_dict(keep_vars=True)
    current = {canonical_path(key): (key, tensor) for key, tensor in state.items()}
    unexpected = [key for key in extra if canonical_path(key) not in current]
    fits = {key: current[canonical_path(key)] for key in extra if key not in unexpected}
    mismatched = [key for key, (_, tensor) in fits.items() if tensor.shape != extra[key].shape]
    mismatched += [
        f"{key} (checkpoint dtype {extra[key].dtype} for a {tensor.dtype} tensor)"
        for key, (_, tensor) in fits.items()
        if tensor.is_floating_point() and not extra[key].is_floating_point()
    ]
    if unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit the model: unexpected keys {unexpected[:6]}, mismatched shapes {mismatched[:6]}"
        )
    return {key: model_key for key, (model_key, _) in fits.items()}


def load_into(model: SwiftModel, root: Path, adapter_name, is_trainable: bool, low_cpu_mem_usage: bool) -> None:
    """Load the selected adapters of ``root`` into ``model``; all or nothing.

    Everything is read under the folder's read lock (a save interrupted by a crash is finished first, see
    :mod:`~peft_swift_ext.core.transactions`). Shapes are compared with the checkpoint's on the meta device
    before anything is allocated, and forwards in other threads wait while the layers change.

    Args:
        model: the model to add the adapters to.
        root: the checkpoint folder.
        adapter_name: SWIFT's selection: None (all), a name, a list, or a dict ``{saved name: new name}``.
        is_trainable: whether the loaded adapters require grad.
        low_cpu_mem_usage: create the adapters' weights on the meta device and assign the loaded tensors.
    """
    with transactions.reading(root):
        found = discover_adapters(root)
        wanted = select_adapters(found, adapter_name)
        clashes = [new for new in wanted.values() if new in model.peft_config]
        if clashes:
            raise ValueError(f"adapter(s) {clashes} already exist in the model; pass a dict to load under new names")
        plan = [read_adapter(found[old], old, new, is_trainable, model.model) for old, new in wanted.items()]
        extra = read_extra_states(root)
        _, saved_active = read_order(root)
        whole = whole_model.read(root)  # the base model saved whole (full fine-tuning beside NEFTune)
    extra_source = root / files.EXTRA_STATES_DIR
    if extra:
        extra_state_keys(model, extra, extra_source)
    if whole is not None:
        whole_model.check(model, *whole)
    with model.activation.structure.writing():
        if not low_cpu_mem_usage:  # low_cpu_mem_usage injects on meta anyway and checks before assigning
            _check_on_meta(model, plan, is_trainable)
        base = safeguards.BaseTensors(model.model)
        overwritten: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            with model.adding_adapters():
                _inject(model, plan, is_trainable, low_cpu_mem_usage, base)
                # An in-place adapter (LISA) writes into the base weights, which a rollback cannot take back: its
                # weights load last, once everything else has (its own keys and shapes are checked before writing).
                in_place = [item for item in plan if model.in_place_tuner(item.new_name) is not None]
                for item in plan:
                    if all(item is not other for other in in_place):
                        model.load_adapter_weights(
                            item.new_name, item.weights, str(item.source), item.saved_name, assign=low_cpu_mem_usage
                        )
                if extra:
                    overwritten = _write_extra_states(model, extra, extra_source)
                for item in in_place:
                    model.load_adapter_weights(item.new_name, item.weights, str(item.source), item.saved_name)
                if whole is not None:  # checked above; written last, as nothing after it can fail
                    whole_model.load(model, whole[0])
        except BaseException:
            _put_back(overwritten)
            base.restore()
            raise
    if saved_active is not None:  # every loaded adapter is active; those saved active lead, in their order
        loaded = list(wanted.values())
        first = [wanted[name] for name in saved_active if name in wanted]
        before = [name for name in model.active_adapters if name not in loaded]
        model.activation.set(before + first + [name for name in loaded if name not in first])


def _inject(
    model: SwiftModel, plan: list[PlannedAdapter], trainable: bool, meta: bool, base: safeguards.BaseTensors
) -> None:
    """Add the planned adapters; raise ``ValueError`` naming the config file if building one fails or if
    building it replaced a tensor of the base model."""
    for item in plan:
        config_file = item.source / files.CONFIG_NAME
        with safeguards.named_errors(config_file, f"cannot build adapter {item.new_name!r} on this model"):
            with safeguards.base_rewriting_initialisers_off(item.config):
                model.add_adapter(item.new_name, item.config, trainable=trainable, low_cpu_mem_usage=meta)
        model.activate_adapter(item.new_name)  # add_adapter leaves it inactive (PEFT); a loaded adapter runs
        changed = base.changed()
        if changed:
            raise ValueError(
                f"{config_file}: building adapter {item.new_name!r} replaced base-model tensors {changed[:6]}; a load "
                "must not change the base model (an initialiser that rewrites base weights?)"
            )


class _CheckedOnMeta(Exception):
    """Ends the dry run of :func:`_check_on_meta` (its adapters are then removed)."""


def _check_on_meta(model: SwiftModel, plan: list[PlannedAdapter], trainable: bool) -> None:
    """Build the planned adapters on the meta device and compare their keys and shapes with the checkpoint's,
    then remove them: a config that asks for more than its file holds (``r=2**20`` beside a 9 KB file) fails here
    without allocating anything."""
    base = safeguards.BaseTensors(model.model)
    try:
        with model.adding_adapters():
            # the device context makes every tensor the injection creates a meta tensor from the start (PEFT's
            # low_cpu_mem_usage moves parameters to meta only after torch.empty has reserved their memory)
            with torch.device("meta"):
                _inject(model, plan, trainable, True, base)
            for item in plan:
                _fitted(model, item.new_name, item.weights, str(item.source), item.saved_name)
            raise _CheckedOnMeta
    except _CheckedOnMeta:
        pass
    except BaseException:
        base.restore()
        raise


def _write_extra_states(
    model: SwiftModel, extra: dict[str, torch.Tensor], source: Path
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Copy the extra states into the base weights under their current keys (undone if it fails); return
    ``(weight, its previous value)`` pairs, for the caller to undo the copy if a later step fails."""
    keys = extra_state_keys(model, extra, source)
    targets = dict(model.model.state_dict(keep_vars=True))
    previous = [(targets[model_key], targets[model_key].detach().clone()) for model_key in keys.values()]
    try:
        state = {model_key: extra[key].to(targets[model_key].dtype) for key, model_key in keys.items()}
        result = model.model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{source}: keys {result.unexpected_keys[:6]} were not taken by the model")
    except BaseException:
        _put_back(previous)
        raise
    return previous


def _put_back(previous: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    with torch.no_grad():
        for tensor, value in previous:
            tensor.copy_(value)


def save(
    model: SwiftModel,
    save_directory: str | os.PathLike,
    names: list[str],
    safe_serialization: bool,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write each adapter of ``names`` to ``save_directory/<adapter>/`` in SWIFT's layout, crash-safely.

    The adapters and ``configuration.json`` replace their previous versions as one unit
    (:func:`~peft_swift_ext.core.transactions.update`); everything else in the folder is kept.

    Args:
        model: the model holding the adapters.
        save_directory: the checkpoint folder (created if needed; other content is kept).
        names: the adapters to write.
        safe_serialization: safetensors, or a torch pickle of plain tensors.
        state_dict: the SwiftModel's full state dict (keys ``base_model.model.<key in the model>``) to take the
            tensors from instead of the live parameters.
    """
    for name in names:
        files.check_adapter_name(name)
    with transactions.update(save_directory) as staged:
        # base weights that train with no adapter saving them (full fine-tuning beside NEFTune): the whole base
        # model goes to the root, as ms-swift writes it (first: the writer wants the staging folder empty)
        whole = bool(whole_model.untracked_trainable(model))
        if whole:
            for written in whole_model.write(model, staged.folder):
                staged.adopt(written)
        for name in names:
            folder = staged.new_folder(name)
            config = model.peft_config[name].to_dict()
            files.write_adapter_files(folder, config, adapter_state_dict(model, name, state_dict), safe_serialization)
        # Adapters that meet on a module nest in the order they were added, and adapters sharing a layer apply in
        # activation order (DoRA normalises what precedes it): both are recorded so a reload rebuilds the same model.
        active = [name for name in model.active_adapters if name in names]
        order = json.dumps({"adapter_order": names, "active_adapters": active, whole_model.ORDER_KEY: whole})
        files.write_text(staged.new_file(files.ORDER_FILE), order)


def adapter_state_dict(
    model: SwiftModel, adapter_name: str, state_dict: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """One adapter's tensors under SWIFT-layout keys (the adapter name kept), read back if offloaded.

    Args:
        model: the model holding the adapter.
        adapter_name: the adapter to read.
        state_dict: the SwiftModel's full state dict to take the tensors from (see :func:`save`).
    """
    with model.offload_store.restored(model.adapter_modules, adapter_name):
        tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for slot, (key, tensor) in model.adapter_slots(adapter_name).items():
            if state_dict is not None:
                full_key = f"{PEFT_KEY_PREFIX}{key}"
                if full_key not in state_dict:
                    raise ValueError(f"the state_dict passed to save_pretrained has no {full_key!r}")
                tensor = state_dict[full_key]
            value = tensor.detach().cpu()
            # safetensors refuses tensors that share memory; adapters are small, so copy the repeats
            tensors[slot.swift_key(adapter_name)] = value.clone() if value.data_ptr() in seen else value
            seen.add(value.data_ptr())
        return tensors


def load_adapter_weights(
    model: SwiftModel,
    adapter_name: str,
    weights: dict[str, torch.Tensor],
    source: str,
    saved_as: str,
    assign: bool = False,
) -> None:
    """Copy a checkpoint's tensors into adapter ``adapter_name``, checking keys, shapes and dtypes first.

    Args:
        model: the model holding the (already injected) adapter.
        adapter_name: the adapter to fill.
        weights: the checkpoint's tensors, in SWIFT layout (keys with ``saved_as``) or PEFT layout
            (``base_model.model.`` keys without adapter name).
        source: the file, for error messages.
        saved_as: the adapter name the checkpoint was saved under.
        assign: replace the (meta) tensors instead of copying into them.
    """
    in_place = model.in_place_tuner(adapter_name)
    by_key = _fitted(model, adapter_name, weights, source, saved_as, loading=True)
    state = {
        model_key: weights[key].to(tensor.dtype) for key, (_, model_key, tensor) in by_key.items() if key in weights
    }
    # an in-place tuner's tensors are the base model's own: copy into them, never replace them
    assign = assign and in_place is None
    model.model.load_state_dict(state, strict=False, assign=assign)
    if in_place is not None:
        in_place.mark_loaded([slot.path for key, (slot, _, _) in by_key.items() if key in weights])
    if assign:
        model.structure_changed()


def _checkpoint_key(tuner: InPlaceTuner | None, slots: dict[Slot, tuple], weights: dict, saved_as: str):
    """How a slot is named in this checkpoint: SWIFT layout, PEFT layout, or an in-place tuner's PEFT keys."""
    # an in-place tuner saved through PEFT (get_peft_model) names its tensors its own way
    if tuner is not None and any(tuner.peft_checkpoint_key(slot.path) in weights for slot in slots):
        return lambda slot: tuner.peft_checkpoint_key(slot.path)
    if tuner is None and any(key.startswith(PEFT_KEY_PREFIX) for key in weights):
        return Slot.peft_key
    return lambda slot: slot.swift_key(saved_as)


def _fitted(
    model: SwiftModel, adapter_name: str, weights: dict, source: str, saved_as: str, loading: bool = False
) -> dict[str, tuple[Slot, str, torch.Tensor]]:
    """Checkpoint key -> ``(slot, key in the model, tensor)`` of the adapter, once the checkpoint is checked to fit."""
    slots = model.adapter_slots(adapter_name, loading=loading)
    key_of = _checkpoint_key(model.in_place_tuner(adapter_name), slots, weights, saved_as)
    by_key = {key_of(slot): (slot, key, tensor) for slot, (key, tensor) in slots.items()}
    missing = [key for key, (slot, _, _) in by_key.items() if slot.required and key not in weights]
    unexpected = [key for key in weights if key not in by_key]
    mismatched = [
        f"{key}: checkpoint {tuple(weights[key].shape)} vs model {tuple(tensor.shape)}"
        for key, (_, _, tensor) in by_key.items()
        if key in weights and tuple(weights[key].shape) != tuple(tensor.shape)
    ]
    mismatched += [
        f"{key}: checkpoint dtype {weights[key].dtype} for a {tensor.dtype} tensor"
        for key, (_, _, tensor) in by_key.items()
        if key in weights and tensor.is_floating_point() and not weights[key].is_floating_point()
    ]
    if missing or unexpected or mismatched:
        found = (("missing", missing), ("unexpected", unexpected), ("mismatched", mismatched))
        raise ValueError(
            f"{source} does not fit adapter {adapter_name!r} of this model: "
            + "; ".join(f"{label} keys: {files.preview_keys(keys)}" for label, keys in found if keys)
        )
    return by_key


def load_adapter(
    model: SwiftModel,
    folder: Path,
    adapter_name: str,
    is_trainable: bool,
    torch_device: str | None,
    autocast_adapter_dtype: bool,
    low_cpu_mem_usage: bool,
) -> None:
    """``SwiftModel.load_adapter``: one adapter folder into an existing adapter (weights only) or a new one.

    Args:
        model: the model to load into.
        folder: a folder holding one adapter (``adapter_config.json`` and weights).
        adapter_name: the adapter to fill, or a new adapter's name.
        is_trainable: for a new adapter, whether it trains.
        torch_device: the device to read the tensors onto first.
        autocast_adapter_dtype: for a new adapter, PEFT's float32 upcast.
        low_cpu_mem_usage: for a new adapter, create it on the meta device and assign the loaded tensors.
    """
    if not (folder / files.CONFIG_NAME).is_file():
        raise ValueError(
            f"{folder} holds no adapter ({files.CONFIG_NAME} is missing); load_adapter takes one adapter's folder"
        )
    _check_trainer_checkpoint_covers_model(model, folder)
    planned = read_adapter(folder, folder.name, adapter_name, is_trainable, model.model)
    if torch_device is not None:
        planned.weights = {key: value.to(torch_device) for key, value in planned.weights.items()}
    if adapter_name in model.peft_config:
        existing = PeftType(model.peft_config[adapter_name].peft_type)
        if PeftType(planned.config.peft_type) != existing:
            raise ValueError(
                f"{folder} holds a {planned.config.peft_type} adapter, but adapter {adapter_name!r} of this model is "
                f"{existing.value}"
            )
        model.load_adapter_weights(adapter_name, planned.weights, str(folder), planned.saved_name)
        return
    with model.adding_adapters():
        model.add_adapter(
            adapter_name,
            planned.config,
            low_cpu_mem_usage=low_cpu_mem_usage,
            autocast_adapter_dtype=autocast_adapter_dtype,
            trainable=is_trainable,
        )
        model.load_adapter_weights(
            adapter_name, planned.weights, str(folder), planned.saved_name, assign=low_cpu_mem_usage
        )


def _check_trainer_checkpoint_covers_model(model: SwiftModel, folder: Path) -> None:
    """A Trainer resumes a model by loading each adapter folder of its checkpoint: refuse, before the first one,
    a checkpoint that does not hold every adapter of the model (another model's, or another layout)."""
    root = next((root for root in (folder, folder.parent) if (root / TRAINER_STATE_NAME).is_file()), None)
    if root is None:
        return
    saved = set(files.list_adapter_folders(root))
    if (root / files.CONFIG_NAME).is_file():
        saved.add("default")
    missing = [name for name in model.peft_config if name not in saved]
    if missing:
        raise ValueError(
            f"{root} is a Trainer checkpoint without the adapter folder(s) {missing} of this SwiftModel (it holds "
            f"{sorted(saved) or 'none'}); resume from a checkpoint this model wrote, in SWIFT's layout"
        )
