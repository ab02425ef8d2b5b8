"""Module names: which modules a config targets, and paths that see through tuner wrappers."""

from __future__ import annotations

from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn


def find_target_modules(model: nn.Module, config: PeftConfig) -> list[str]:
    """Names of the modules of ``model`` that ``config.target_modules`` selects.

    Matching follows PEFT (and SWIFT): a string is a regex that must match the whole module name, a list
    matches names equal to an entry or ending in ``.entry``; ``base_layer`` segments of wrapped modules
    are ignored. The empty string selects the root model itself (``[""]``), as in SWIFT. Returns the
    actual module names. Raises ``ValueError`` naming the pattern and a few module names when nothing matches.

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
    """Drop the ``base_layer`` segments that tuner wrappers add to module paths."""
    return ".".join(part for part in path.split(".") if part != "base_layer")


def base_module_names(model: nn.Module) -> list[str]:
    """Names of the modules of the base model, leaving out the adapters' own sub-modules."""
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
