"""Putting adapters of several tuner types into one model, and taking them out again.

Each tuner type gets one PEFT ``BaseTuner`` over the shared base model. PEFT never injects below an existing
tuner layer, so while one tuner injects, the other types' layers are taken out of the module tree and put back
afterwards around whatever then occupies their place.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import PeftType
from torch import nn

from ..compat import (
    PEFT_TYPE_TO_TUNER_MAPPING,
    AuxiliaryTrainingWrapper,
    ModulesToSaveWrapper,
    adapter_names_in,
    cast_adapter_dtype,
    delete_wrapper_adapter,
    has_adapters,
)
from ..core.contract import StructureOwner
from ..core.layer import SwiftTunerLayer
from ..core.paths import canonical_path, find_target_modules, literal_patterns, parent_of
from ..core.tuner import SwiftBaseTuner, follow_feature_sources


def inject(
    model: nn.Module,
    tuners: dict[PeftType, BaseTuner],
    adapter_name: str,
    config: PeftConfig,
    low_cpu_mem_usage: bool = False,
    autocast_adapter_dtype: bool = True,
) -> None:
    """Inject one adapter into ``model`` with its type's tuner (created on first use); all or nothing.

    Where adapters of different types meet on one module, a later adapter's layer wraps the earlier ones. This
    package's tuners see through other tuners' layers by themselves; PEFT's own tuners never inject below an
    existing tuner layer, so for them the other types' layers leave the tree during the injection and go back
    in afterwards, below the layers the injection created.

    Args:
        model: the shared base model.
        tuners: the tuner of each type already in ``model``; a new one is added here.
        adapter_name: the new adapter's name.
        config: its config.
        low_cpu_mem_usage: create its weights on the meta device (to be filled by a load).
        autocast_adapter_dtype: upcast float16/bfloat16 adapter weights to float32, as ``PeftModel`` does.
    """
    if not isinstance(config, PeftConfig):
        raise TypeError(f"config for {adapter_name!r} must be a PeftConfig, got {type(config).__name__}")
    peft_type = PeftType(config.peft_type)
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        raise ValueError(f"{type(config).__name__} ({peft_type.value}) is not an injectable tuner type")
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
    had_peft_config = hasattr(model, "peft_config")
    hide = (
        contextlib.nullcontext() if issubclass(tuner_cls, SwiftBaseTuner) else _other_layers_hidden(model, tuner_cls)
    )
    try:
        with hide, literal_patterns(model, config):  # PEFT's re never sees the config's own regexes
            targets = getattr(config, "target_modules", None)
            if isinstance(targets, (list, tuple, set)) or (isinstance(targets, str) and targets != "all-linear"):
                find_target_modules(model, config)  # this package's clear error, before PEFT's
            tuner = tuners.get(peft_type)
            if tuner is None:
                tuner = tuners[peft_type] = tuner_cls(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
            else:
                tuner.peft_config[adapter_name] = config
                tuner.inject_adapter(model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        cast_adapter_dtype(tuners[peft_type], adapter_name, autocast_adapter_dtype)
        follow_feature_sources(model)  # a new layer may now wrap a module other adapters read features from
    except BaseException:
        remove(model, tuners, adapter_name, peft_type)
        raise
    finally:
        # PEFT's tuners set model.peft_config; the adapters' configs belong to the SwiftModel
        if not had_peft_config and hasattr(model, "peft_config"):
            del model.peft_config


@contextlib.contextmanager
def _other_layers_hidden(model: nn.Module, tuner_cls: type[BaseTuner]) -> Iterator[None]:
    """Take the layers of other tuner types out of the module tree while one of PEFT's tuners injects.

    On exit each layer goes back to its place (found through any layer created meanwhile), below the layers
    the injection created there: it belongs to an earlier adapter, and earlier adapters sit inside later ones.
    """
    keep = tuner_cls.tuner_layer_cls
    hidden: list[tuple[str, BaseTunerLayer]] = []
    while found := next(
        (
            (path, module)
            for path, module in model.named_modules()
            if isinstance(module, BaseTunerLayer) and not isinstance(module, keep)
        ),
        None,
    ):
        path, layer = found
        parent, child = parent_of(model, path)
        setattr(parent, child, layer.base_layer)
        hidden.append((path, layer))
    existing = {id(module) for module in model.modules() if isinstance(module, BaseTunerLayer)}
    try:
        yield
    finally:
        for path, layer in reversed(hidden):  # innermost first, so outer layers wrap the inner ones again
            holder, attr = parent_of(model, path)
            occupant = holder._modules[attr]
            while isinstance(occupant, BaseTunerLayer) and id(occupant) not in existing:
                holder, attr, occupant = occupant, "base_layer", occupant.base_layer
            layer.base_layer = occupant
            setattr(holder, attr, layer)


def check_merge_keeps_outputs(model: nn.Module, names: list[str], active: set[str]) -> None:
    """Refuse to merge adapters of PEFT's layers into base weights that lie below another active tuner layer.

    A PEFT layer (LoRA, DoRA...) folds its adapters into the weight of the module it finally wraps. A layer in
    between belongs to an adapter added earlier, and the PEFT layer's output was computed from its output; once
    merged, that adapter would act on the merged weight's output instead, and the model would compute something
    else. Only adapters of PEFT's layers that are merged together add up on the weight either way. PEFT's layer
    also stops applying its unmerged adapters once one is merged, so the active ones of a layer merge together.
    """
    for path, layer in model.named_modules():
        if not isinstance(layer, BaseTunerLayer) or isinstance(layer, SwiftTunerLayer):
            continue
        merging = sorted(set(names) & adapter_names_in(layer))
        left_out = sorted((adapter_names_in(layer) & active) - set(names))
        if merging and left_out:
            raise ValueError(
                f"cannot merge {merging} at '{canonical_path(path)}' without {left_out}, which are active in the same "
                f"layer: a layer with merged adapters runs only its base weights, so {left_out} would stop acting. "
                "Merge them together, or deactivate them first"
            )
        inner = layer._modules.get("base_layer")  # a layer that wraps nothing merges nothing into weights
        while merging and isinstance(inner, BaseTunerLayer):
            inside = adapter_names_in(inner) & active
            blocking = sorted(inside if isinstance(inner, SwiftTunerLayer) else inside - set(names))
            if blocking:
                raise ValueError(
                    f"cannot merge {merging} at '{canonical_path(path)}': it wraps the layer of {blocking}, which was "
                    f"added earlier and is active; merged into the base weights, {merging} would act before "
                    f"{blocking} and the outputs would change. Deactivate {blocking} first, or merge in a model where "
                    f"{merging} was added first"
                )
            inner = inner._modules.get("base_layer")


def remove(model: nn.Module, tuners: dict[PeftType, BaseTuner], adapter_name: str, peft_type: PeftType) -> None:
    """Delete one adapter's layers and entries; modules left without adapters get their original module back.

    Args:
        model: the shared base model.
        tuners: the tuner of each type; a tuner left without adapters is dropped.
        adapter_name: the adapter to remove.
        peft_type: its type.
    """
    tuner = tuners.get(peft_type)
    if tuner is None:
        return
    tuner.peft_config.pop(adapter_name, None)
    for module in list(model.modules()):
        if adapter_name not in adapter_names_in(module):
            continue
        if isinstance(module, BaseTunerLayer):
            module.delete_adapter(adapter_name)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            delete_wrapper_adapter(module, adapter_name)
    if isinstance(tuner, StructureOwner):
        tuner.remove_adapter_structures(adapter_name)
    _unwrap_empty_layers(model)
    follow_feature_sources(model)  # features of a module whose layer went are read from what is there now
    if not tuner.peft_config:
        del tuners[peft_type]


def unwrap_all(model: nn.Module, tuners: dict[PeftType, BaseTuner], merged: bool) -> None:
    """Remove every tuner layer and wrapper; ``modules_to_save`` copies win when ``merged``.

    Args:
        model: the shared base model.
        tuners: the tuner of each type (told first, so each can undo what it did outside its layers).
        merged: whether the adapters were merged into the base weights.
    """
    for tuner in tuners.values():
        if isinstance(tuner, StructureOwner):
            tuner.finalize_unload(merged)
    for path, module in reversed(_modules_outside_wrappers(model)):
        if isinstance(module, ModulesToSaveWrapper):
            active = [name for name in module.active_adapters if name in module.modules_to_save]
            kept = module.modules_to_save[active[0]] if merged and active else module.original_module
            setattr(*parent_of(model, path), kept)
        elif isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)):
            setattr(*parent_of(model, path), _wrapped(module))  # trainable tokens: a merge wrote into the original
    tuners.clear()


def _unwrap_empty_layers(model: nn.Module) -> None:
    """Put the original module back wherever a tuner layer or wrapper has no adapter left."""
    for path, module in reversed(_modules_outside_wrappers(model)):
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and not has_adapters(module):
            setattr(*parent_of(model, path), _wrapped(module))


def _wrapped(module: BaseTunerLayer | AuxiliaryTrainingWrapper) -> nn.Module:
    return module.base_layer if isinstance(module, BaseTunerLayer) else module.original_module


def _modules_outside_wrappers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``named_modules`` without the tuner layers that PEFT's auxiliary wrappers keep inside themselves.

    A trainable-tokens wrapper holds its own tuner layer (``token_adapter``) and reaches the original module
    through it: unwrapping that layer first would leave a broken wrapper in the model. The wrapper goes as a whole.
    """
    modules = list(model.named_modules())
    wrappers = {path for path, module in modules if isinstance(module, AuxiliaryTrainingWrapper)}
    return [(path, module) for path, module in modules if path.rpartition(".")[0] not in wrappers or not path]
