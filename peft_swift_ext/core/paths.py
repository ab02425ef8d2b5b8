"""Module names: which modules a config targets, and paths that see through tuner wrappers."""

from __future__ import annotations

import re

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn


def find_target_modules(model: nn.Module, config: PeftConfig) -> list[str]:
    """Names of the modules of ``model`` that ``config.target_modules`` selects.

    Matching follows PEFT (and SWIFT): a string is a regex that must match the whole module name, a list
    matches names equal to an entry or ending in ``.entry``; ``base_layer`` segments of wrapped modules
    are ignored. The empty string selects the root model itself (``[""]``), as in SWIFT. Returns the
    actual module names, for a module wrapped by tuner layers the outermost layer's. Raises ``ValueError``
    naming the pattern and a few module names when nothing matches.

    Args:
        model: the model to search; modules inside existing tuner layers (other than the wrapped
            ``base_layer``) are skipped.
        config: any config with ``target_modules`` (and optionally ``exclude_modules``).
    """
    if config.target_modules == "":
        return [""]  # SWIFT's name for the root model; only tuners with ``wraps_root`` accept it
    names = base_module_names(model)
    # Match on names without the "base_layer" segments other tuners' wrappers add, so targets keep
    # meaning the same modules however many tuners are stacked.
    matched = [name for name in names if check_target_module_exists(config, canonical_path(name))]
    # A wrapped module is listed as its wrapper and as the wrapper's base_layer: the outermost comes first.
    matched = list({canonical_path(name): name for name in reversed(matched)}.values())[::-1]
    if not matched:
        canonical = list(dict.fromkeys(canonical_path(name) for name in names))
        sample = ", ".join(canonical[:8]) + (", ..." if len(canonical) > 8 else "")
        targets = config.target_modules
        shown = sorted(targets) if isinstance(targets, (set, frozenset)) else targets
        raise ValueError(
            f"{type(config).__name__}.target_modules={shown!r} matches no module of "
            f"{type(model).__name__}; module names look like: {sample}"
        )
    return matched


def canonical_path(path: str) -> str:
    """Drop the ``base_layer`` segments that tuner wrappers add to module paths.

    Args:
        path: a module path in a model with tuner layers.
    """
    return ".".join(part for part in path.split(".") if part != "base_layer")


def base_module_names(model: nn.Module) -> list[str]:
    """Names of the modules of the base model, leaving out the adapters' own sub-modules.

    Args:
        model: a model, possibly with tuner layers in it.
    """
    tuner_layers: list[str] = []
    names = []
    for name, module in model.named_modules():
        if not name:
            continue
        owner = max((t for t in tuner_layers if name.startswith(t + ".")), key=len, default=None)
        if owner is not None and not name[len(owner) + 1 :].startswith("base_layer"):
            continue
        names.append(name)
        if isinstance(module, BaseTunerLayer):
            tuner_layers.append(name)
    return names


def parent_of(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute name)`` of the module at ``path``, seeing through tuner layers.

    ``path`` may be canonical (without ``base_layer`` segments): wherever a segment is not a real child of a
    tuner layer, the walk continues in the module the layer wraps. The parent returned is the module that
    really holds the child, so ``setattr(parent, name, ...)`` replaces it where the model's own code calls
    it (never on a wrapper, which would only shadow it).

    Args:
        model: the root module.
        path: a dotted module path; ``""`` (the root) gives ``(model, "")``.
    """
    if not path:
        return model, ""
    *parents, child = path.split(".")
    module = model
    for part in parents:
        module = _child(module, part, path)
    while isinstance(module, BaseTunerLayer) and child not in module._modules:
        module = module.base_layer
    return module, child


def module_at(model: nn.Module, path: str) -> nn.Module:
    """The module at ``path`` (canonical or actual), the outermost tuner layer where one wraps it.

    Args:
        model: the root module.
        path: a dotted module path; ``""`` is the root.
    """
    parent, child = parent_of(model, path)
    return parent if not path else _child(parent, child, path)


def canonical_module_names(model: nn.Module) -> list[str]:
    """The base model's module names without ``base_layer`` segments, each once, in model order.

    Args:
        model: a model, possibly with tuner layers in it.
    """
    return list(dict.fromkeys(canonical_path(name) for name in base_module_names(model)))


def _child(module: nn.Module, name: str, path: str) -> nn.Module:
    while name not in module._modules and isinstance(module, BaseTunerLayer):
        module = module.base_layer
    if name not in module._modules:
        raise AttributeError(f"no module at '{path}': {type(module).__name__} has no child '{name}'")
    return module._modules[name]


def name_matches(name: str, pattern: str | list[str] | tuple[str, ...] | None) -> bool:
    """SWIFT's and PEFT's module-name rule: a str is a regex matching the whole name, a list names modules by
    suffix (equal to an entry, or ending in ``.entry``); None matches everything.

    Args:
        name: a module (or parameter) path.
        pattern: the selector.
    """
    if pattern is None:
        return True
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def adapter_parameter_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that adapters added: everything in a tuner layer or wrapper but what it wraps.

    Args:
        model: a model, possibly with tuner layers and PEFT's auxiliary wrappers in it.
    """
    wrapped = {"base_layer", "original_module"}
    return {
        id(param)
        for module in model.modules()
        if isinstance(module, BaseTunerLayer) or hasattr(module, "original_module")
        for name, child in module.named_children()
        if name not in wrapped
        for param in child.parameters()
    }
