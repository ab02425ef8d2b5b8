"""The layer every plugin tuner puts in place of a targeted module, and helpers on such layers.

A plugin tuner wraps each targeted module in a :class:`SwiftTunerLayer` subclass that keeps one
``nn.ModuleDict`` (or ``nn.ParameterDict``) per sub-layer, keyed by adapter name, with attribute names
starting with the tuner's prefix. That layout puts the adapter name right after the prefixed attribute
(``...output.adapter_down.<adapter>.weight``), which is what PEFT's save/load key rewriting expects on
every supported version.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Iterable, Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..compat import set_active_adapters_view
from .probes import FeatureProbes
from .rows import current_rows
from .scope import scoped_adapters


class SwiftTunerLayer(nn.Module, BaseTunerLayer):
    """Base of the modules a plugin tuner puts in place of a targeted module.

    Subclasses declare ``adapter_layer_names`` (their per-adapter ``ModuleDict``/``ParameterDict``
    attributes, first one decides which adapters exist here) and ``other_param_names`` (every other attribute
    keyed by adapter name, so that PEFT's ``delete_adapter`` removes those entries too), create entries in
    ``update_layer`` and implement ``forward``. Attribute look-ups that miss fall through to the wrapped module,
    because model code often reads attributes of the layers it owns (e.g. ``layer.attention_type``).

    Args:
        base_layer: the module being wrapped.
    """

    tuner_name = "tuner"
    #: hooks on other modules whose features this layer reads (Res-Tuning's root and stems, SCEdit's hints)
    probes: FeatureProbes | None = None

    #: True for tuners whose merge only marks adapters as merged (their layer's ``forward`` decides what that
    #: means: LLaMA-PRO keeps running its blocks, NEFTune stops its noise); False: merging is refused.
    merges_by_marking = False

    def adapters_passing_tokens_on(self) -> list[str]:
        """This layer's adapters whose output carries tokens its caller's masks and positions do not cover (deep
        prompts between their first and last layer); a module run on that output with the caller's arguments would
        not fit it. None for most tuners."""
        return []

    def __init__(self, base_layer: nn.Module) -> None:
        nn.Module.__init__(self)
        self.base_layer = base_layer
        set_active_adapters_view(self, [])
        self.merged_adapters: list[str] = []
        # PEFT expects every tuner layer to have these (None where the wrapped module has no such sizes)
        self.in_features, self.out_features = in_and_out_features(base_layer)
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
        # PEFT reads base_layer.weight, which wrapped blocks (decoder layers, UNet blocks) lack: follow their first
        # tensor's device and first floating tensor's dtype. The adapter is created in that dtype; PeftModel then, with
        # autocast_adapter_dtype=True (its default), upcasts fp16/bf16 adapters to float32.
        return device_and_dtype(itertools.chain(base_layer.parameters(), base_layer.buffers()))

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: torch.device | None = None) -> None:
        # PEFT's own version does the same from the wrapped module's weight alone before peft 0.19 (no look-up hook),
        # which left adapters around blocks where they were created: the move is done here on every peft version.
        base_device, base_dtype = self._get_base_layer_device_and_dtype(self.get_base_layer())
        device = device if device is not None else base_device
        if device is None:
            return
        floating_base = base_dtype is not None and (base_dtype.is_floating_point or base_dtype.is_complex)
        dtype = base_dtype if floating_base else None
        for attr in (*self.adapter_layer_names, *self.other_param_names):
            container = getattr(self, attr, None)
            if not isinstance(container, (nn.ModuleDict, nn.ParameterDict)) or adapter_name not in container:
                continue
            entry = container[adapter_name]
            tensors = [entry] if isinstance(entry, torch.Tensor) else list(entry.parameters())
            if any(t.device.type == "meta" for t in tensors):
                continue  # created empty (low_cpu_mem_usage): the checkpoint that is loaded next places it
            floating = not isinstance(entry, torch.Tensor) or entry.is_floating_point() or entry.is_complex()
            container[adapter_name] = entry.to(device, dtype=dtype) if dtype and floating else entry.to(device)

    def capturing(self, adapter_name: str) -> bool:
        """Whether :attr:`probes` capture features for ``adapter_name`` now: only for an adapter that will consume
        them (active, or named by a row of a mixed batch), so nothing is held otherwise."""
        rows = current_rows()
        return adapter_name in (self.adapters_to_apply() if rows is None else rows)

    def delete_adapter(self, adapter_name: str) -> None:
        """Unhook the adapter's feature probes (if this layer has any), then delete its entries as PEFT does.

        Args:
            adapter_name: the adapter to delete.
        """
        if self.probes is not None:
            self.probes.remove(adapter_name)
        super().delete_adapter(adapter_name)

    def remove_probes(self) -> None:
        """Remove the hooks this layer put on other modules (its :attr:`probes`, if any), before it is unloaded."""
        if self.probes is not None:
            self.probes.remove()

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Mark adapters as merged, for tuners with ``merges_by_marking``; refuse for every other tuner.

        PEFT's rules apply: adapters already merged are skipped with PEFT's warning, and with ``safe_merge`` an
        adapter whose weights hold NaN or infinity is refused (with PEFT's message) before this layer changes.

        Args:
            safe_merge: check each adapter's weights for non-finite values first.
            adapter_names: the adapters to merge; the active ones by default.

        Raises:
            ValueError: the tuner changes activations, not weights (naming it; ``unload()`` removes the adapters
                instead), or ``safe_merge`` found a non-finite weight.
        """
        if not self.merges_by_marking:
            raise ValueError(
                f"{self.tuner_name} adapters change activations, not weights, so they cannot be merged into the "
                "base model; use unload() to remove them instead"
            )
        owned = getattr(self, self.adapter_layer_names[0])
        names = [name for name in check_adapters_to_merge(self, adapter_names) if name in owned]
        if safe_merge:
            for name in names:
                if not all(torch.isfinite(p).all() for p in adapter_parameters(self, name)):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        """Undo ``merge``: forget the merge marks (PEFT's warning when nothing is merged)."""
        if not self.merges_by_marking:
            return  # nothing was ever merged: merge refuses
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.merged_adapters.clear()


def in_and_out_features(module: nn.Module) -> tuple[int | None, int | None]:
    """The input and output sizes of a module, as PEFT's layers record them; ``(None, None)`` where unknown.

    Args:
        module: the wrapped module (another tuner's layer stands for the module it wraps).
    """
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.in_channels, module.out_channels
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return module.normalized_shape[0], module.normalized_shape[0]
    return None, None


def new_parameters_go_to_meta() -> bool:
    """Whether a parameter registered now lands on the meta device.

    That is the case inside PEFT's (and accelerate's) ``init_empty_weights``, which PEFT enters for
    ``low_cpu_mem_usage=True``; tuners that make their weights by copying modules rather than constructing them
    ask this to create meta weights there too.
    """
    probe = nn.Module()
    probe.register_parameter("probe", nn.Parameter(torch.empty(0)))
    return probe.probe.device.type == "meta"


def device_and_dtype(tensors: Iterable[torch.Tensor]) -> tuple[torch.device | None, torch.dtype | None]:
    """The device of the first tensor and the dtype of the first floating-point one (None where there is none)."""
    device = dtype = None
    for tensor in tensors:
        device = tensor.device if device is None else device
        if tensor.is_floating_point():
            return device, tensor.dtype
    return device, dtype


# PEFT strips the adapter name from saved keys only where it is the last or second-to-last segment, and on
# load puts it back right after the prefixed container. Adapters made of nested modules (copied decoder
# blocks, bypass networks) would break both rules, so their state-dict keys join the nested path with "-"
# (never part of a Python attribute name): "<attr>.<adapter>.blocks-0-weight".
_NESTED_SEPARATOR = "-"


def _rekey_nested_adapter_keys(
    module: SwiftTunerLayer, state_dict: dict, prefix: str, *hook_args, old: str, new: str
) -> None:
    """State-dict hook (with ``old``/``new`` bound): within each nested adapter's keys, ``old`` becomes ``new``."""
    for attr in module.adapter_layer_names:
        container = getattr(module, attr)
        if isinstance(container, nn.ModuleDict):
            for key_prefix in (f"{prefix}{attr}.{adapter_name}." for adapter_name in container):
                for key in [k for k in state_dict if k.startswith(key_prefix) and old in k[len(key_prefix) :]]:
                    state_dict[key_prefix + key[len(key_prefix) :].replace(old, new)] = state_dict.pop(key)


_flatten_nested_adapter_keys = functools.partial(_rekey_nested_adapter_keys, old=".", new=_NESTED_SEPARATOR)
_unflatten_nested_adapter_keys = functools.partial(_rekey_nested_adapter_keys, old=_NESTED_SEPARATOR, new=".")


def follow_parent_mode(layer: SwiftTunerLayer, parent: nn.Module) -> None:
    """Put a tuner layer and its adapters in the train/eval mode of the module that holds it.

    New modules start in training mode, and so do wrappers other tuners put around a target (PEFT's
    ``ModulesToSaveWrapper``): without this an eval model would add NEFTune noise or dropout. The wrapped
    module keeps its own modes.
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
