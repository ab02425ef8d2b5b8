"""The layer every plugin tuner puts in place of a targeted module, and helpers on such layers.

A plugin tuner wraps each targeted module in a :class:`SwiftTunerLayer` subclass that keeps one
``nn.ModuleDict`` (or ``nn.ParameterDict``) per sub-layer, keyed by adapter name, with attribute names
starting with the tuner's prefix. That layout puts the adapter name right after the prefixed attribute
(``...output.adapter_down.<adapter>.weight``), which is what PEFT's save/load key rewriting expects on
every supported version.
"""

from __future__ import annotations

from collections.abc import Iterator

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..compat import set_active_adapters_view
from .probes import FeatureProbes
from .scope import scoped_adapters


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
    #: hooks on other modules whose features this layer reads (Res-Tuning's root and stems, SCEdit's hints)
    probes: FeatureProbes | None = None

    def __init__(self, base_layer: nn.Module) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        set_active_adapters_view(self, [])
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
        scope = scoped_adapters(self.__dict__.get("scope_token"))
        owned = getattr(self, self.adapter_layer_names[0])
        for name in self.active_adapters if scope is None else scope:
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
