"""Shared machinery of the plugin tuners: a wrapping tuner layer and a ``BaseTuner`` with SWIFT semantics.

A plugin tuner wraps each targeted module in a :class:`SwiftTunerLayer` subclass that keeps one
``nn.ModuleDict`` (or ``nn.ParameterDict``) per sub-layer, keyed by adapter name, with attribute names
starting with the tuner's prefix. That layout puts the adapter name right after the prefixed attribute
(``...output.adapter_down.<adapter>.weight``), which is what PEFT's save/load key rewriting expects on
every supported version.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn


class SwiftTunerLayer(nn.Module, BaseTunerLayer):
    """Base of the modules a plugin tuner puts in place of a targeted module.

    Subclasses declare ``adapter_layer_names`` (their per-adapter ``ModuleDict``/``ParameterDict``
    attributes, first one decides which adapters exist here), create entries in ``update_layer`` and
    implement ``forward``. Attribute look-ups that miss fall through to the wrapped module, because model
    code often reads attributes of the layers it owns (e.g. ``layer.attention_type``).

    Args:
        base_layer: the module being wrapped.
    """

    tuner_name = "tuner"

    def __init__(self, base_layer: nn.Module) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.register_state_dict_post_hook(_flatten_nested_adapter_keys)
        self.register_load_state_dict_pre_hook(_unflatten_nested_adapter_keys)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer" or "base_layer" not in self._modules:
                raise
            return getattr(self._modules["base_layer"], name)

    def adapters_to_apply(self) -> Iterator[str]:
        """Names of the active adapters that have weights in this layer, in activation order."""
        if self.disable_adapters:
            return
        owned = getattr(self, self.adapter_layer_names[0])
        for name in self.active_adapters:
            if name in owned:
                yield name

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module):
        # PEFT reads base_layer.weight, which wrapped blocks (decoder layers, UNet blocks) lack: follow their
        # first tensor's device. The dtype stays the adapter's own; forward casts, so fp16/bf16 bases train
        # fp32 adapters.
        tensor = next(base_layer.parameters(), None)
        if tensor is None:
            tensor = next(base_layer.buffers(), None)
        return (None if tensor is None else tensor.device), None

    def remove_probes(self) -> None:
        """Remove the hooks this layer put on other modules (none by default), before it is unloaded."""

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Refuse: this tuner changes activations, not weights, so there is nothing to fold into the base.

        Tuners whose adapters can be merged (LLaMA-PRO, NEFTune) override this.

        Args:
            safe_merge: PEFT's flag (check for NaNs before merging); unused here.
            adapter_names: the adapters to merge; unused here.

        Raises:
            ValueError: always, naming the tuner; ``unload()`` removes the adapters instead.
        """
        raise ValueError(
            f"{self.tuner_name} adapters change activations, not weights, so they cannot be merged into the base "
            "model; use unload() to remove them instead"
        )

    def unmerge(self) -> None:
        """Undo ``merge``: a no-op here, since ``merge`` refuses."""
        # Nothing was ever merged (merge refuses), so there is nothing to undo.
        return None


# PEFT strips the adapter name from saved keys only where it is the last or second-to-last segment, and on
# load puts it back right after the prefixed container. Adapters made of nested modules (copied decoder
# blocks, bypass networks) would break both rules, so their state-dict keys join the nested path with "-"
# (never part of a Python attribute name): "<attr>.<adapter>.blocks-0-weight".
_NESTED_SEPARATOR = "-"


def _flatten_nested_adapter_keys(module: SwiftTunerLayer, state_dict: dict, prefix: str, local_metadata) -> None:
    for key_prefix in _adapter_key_prefixes(module, prefix):
        for key in [k for k in state_dict if k.startswith(key_prefix) and "." in k[len(key_prefix) :]]:
            state_dict[key_prefix + key[len(key_prefix) :].replace(".", _NESTED_SEPARATOR)] = state_dict.pop(key)


def _unflatten_nested_adapter_keys(module: SwiftTunerLayer, state_dict: dict, prefix: str, *args) -> None:
    for key_prefix in _adapter_key_prefixes(module, prefix):
        for key in [k for k in state_dict if k.startswith(key_prefix) and _NESTED_SEPARATOR in k[len(key_prefix) :]]:
            state_dict[key_prefix + key[len(key_prefix) :].replace(_NESTED_SEPARATOR, ".")] = state_dict.pop(key)


def _adapter_key_prefixes(module: SwiftTunerLayer, prefix: str) -> Iterator[str]:
    for attr in module.adapter_layer_names:
        container = getattr(module, attr)
        if isinstance(container, nn.ModuleDict):
            for adapter_name in container:
                yield f"{prefix}{attr}.{adapter_name}."


def follow_parent_mode(layer: SwiftTunerLayer, parent: nn.Module) -> None:
    """Put a tuner layer and its adapters in the train/eval mode of the module that holds it.

    New modules start in training mode, and so do wrappers other tuners put around a target (PEFT's
    ``ModulesToSaveWrapper``): without this an eval model would add NEFTune noise or dropout. The wrapped
    module keeps its own modes.

    Args:
        layer: the tuner layer, already in place.
        parent: the module that holds it.
    """
    wrapped = set(layer.base_layer.modules())
    for module in layer.modules():
        if module not in wrapped:
            module.training = parent.training


def adapter_parameters(layer: SwiftTunerLayer, adapter_name: str) -> Iterator[nn.Parameter]:
    """The parameters that belong to ``adapter_name`` inside one tuner layer."""
    for attr in layer.adapter_layer_names:
        container = getattr(layer, attr)
        if adapter_name not in container:
            continue
        entry = container[adapter_name]
        if isinstance(entry, nn.Parameter):
            yield entry
        else:
            yield from entry.parameters()


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


class SwiftBaseTuner(BaseTuner):
    """``BaseTuner`` for the plugin tuners: clear target errors and a clear refusal to merge.

    Subclasses set ``prefix``, ``tuner_layer_cls`` and implement ``_create_and_replace``.
    ``mergeable`` stays False for tuners that change activations rather than weights; ``wraps_root`` is True
    for tuners that can take the root model itself as their target (``target_modules=""``).
    """

    mergeable = False
    wraps_root = False
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config: PeftConfig, model_config: dict) -> PeftConfig:
        if getattr(peft_config, "target_modules", None) is None:
            raise ValueError(f"{type(peft_config).__name__}.target_modules must be set")
        return peft_config

    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs) -> None:
        """Check every targeted module first (clear errors, model untouched), then wrap them as PEFT does.

        Args:
            model: the model to add the adapter to.
            adapter_name: the name of an adapter whose config is already in ``peft_config``.
            **kwargs (Any): passed to PEFT's ``BaseTuner.inject_adapter`` (``autocast_adapter_dtype``,
                ``low_cpu_mem_usage``, ...).
        """
        config = self.peft_config[adapter_name]
        targets = find_target_modules(model, config)
        for name in targets:
            self._validate_target(model.get_submodule(name), name, config)
        if targets != [""]:
            super().inject_adapter(model, adapter_name, **kwargs)
            return
        # PEFT reads target_modules='' as "no targets given": attach to the root here, then do its housekeeping.
        self._create_and_replace(config, adapter_name, model, "", model, current_key="")
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
        self._mark_only_adapters_as_trainable(model)

    def _validate_target(self, module: nn.Module, name: str, config: PeftConfig) -> None:
        """Raise a clear error if ``module`` cannot take this tuner; runs before anything is injected."""
        if name == "" and not self.wraps_root:
            raise ValueError(
                f"{type(config).__name__}.target_modules='' selects the root model, which "
                f"{self.tuner_layer_cls.tuner_name} cannot wrap; target its sub-modules instead"
            )
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            raise ValueError(
                f"{type(config).__name__}.target_modules selects '{name}', a {type(module).__name__}; "
                "target the blocks inside it instead"
            )

    @classmethod
    def from_swift_state_dict(
        cls, weights: dict[str, torch.Tensor], adapter_name: str, config: PeftConfig, model: nn.Module
    ) -> dict[str, torch.Tensor]:
        """Rewrite an ms-swift checkpoint's keys into this tuner's layout (unchanged by default).

        Args:
            weights: the checkpoint's tensors.
            adapter_name: the name the adapter was saved under.
            config: the adapter's config, already translated.
            model: the model it will be loaded into (not yet changed), for tuners whose key layout
                depends on where their targets are.
        """
        return weights

    def _update_or_wrap(
        self, target: nn.Module, parent: nn.Module, target_name: str, new_layer, adapter_name: str, *args, **kwargs
    ) -> None:
        """Add ``adapter_name`` to ``target`` if it already is this tuner's layer, else wrap it first.

        Args:
            target, parent, target_name: as PEFT passes them to ``_create_and_replace``.
            new_layer: builds this tuner's layer around a module.
            adapter_name, args, kwargs: passed to the layer's ``update_layer``.
        """
        layer = target if isinstance(target, self.tuner_layer_cls) else new_layer(target)
        layer.update_layer(adapter_name, *args, **kwargs)
        if layer is not target:
            self._replace_module(parent, target_name, layer, target)
        follow_parent_mode(layer, parent)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # PEFT's version copies child.weight/bias and moves by them; wrapped blocks have neither, and
        # update_layer already put the adapter on the base layer's device.
        setattr(parent, child_name, new_module)

    def _unload_and_optionally_merge(self, merge: bool = True, **kwargs) -> nn.Module:
        if merge:
            self._check_merge_allowed()
        self.finalize_unload(merge)
        return super()._unload_and_optionally_merge(merge=merge, **kwargs)

    def finalize_unload(self, merged: bool) -> None:
        """Undo what the tuner attached outside its layers (hooks on other modules) before the layers go.

        Args:
            merged: whether the adapters were merged first (tuners that add modules keep them then).
        """
        for module in list(self.model.modules()):  # a probe may take its layer out of the tree
            if isinstance(module, self.tuner_layer_cls):
                module.remove_probes()

    def _check_merge_allowed(self) -> None:
        if not self.mergeable:
            raise ValueError(
                f"{self.tuner_layer_cls.tuner_name} adapters cannot be merged into the base model; "
                "use unload() to remove them instead"
            )
        super()._check_merge_allowed()

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        for param in model.parameters():
            param.requires_grad = False
        for module in model.modules():
            if isinstance(module, self.tuner_layer_cls):
                for name in module.active_adapters:
                    for param in adapter_parameters(module, name):
                        param.requires_grad = True


def rename_swift_keys(
    weights: dict[str, torch.Tensor], swift_attr: str, adapter_name: str, containers: dict[str, str]
) -> dict[str, torch.Tensor]:
    """Turn ``<path>.<swift_attr>.<sub>.<rest>`` keys into ``<path>.<containers[sub]>.<adapter_name>.<rest>``.

    Keys that do not have this form are kept as they are (the load then reports them as unexpected).
    A sub-name mapped from ``""`` matches every remaining sub-path (``<swift_attr>.<rest>``).
    """
    renamed = {}
    for key, tensor in weights.items():
        parts = key.split(".")
        if swift_attr not in parts:
            renamed[key] = tensor
            continue
        at = parts.index(swift_attr)
        path, rest = parts[:at], parts[at + 1 :]
        if rest and rest[0] in containers:
            new = [*path, containers[rest[0]], adapter_name, *rest[1:]]
        elif "" in containers:
            new = [*path, containers[""], adapter_name, *rest]
        else:
            new = parts
        renamed[".".join(new)] = tensor
    return renamed
