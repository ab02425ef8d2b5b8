"""Every use of PEFT's private state, in one place.

PEFT's public API (``PeftConfig``, ``BaseTuner`` and ``BaseTunerLayer`` with the hooks their docstrings tell
subclasses to override, ``register_peft_method``) is used directly everywhere. What PEFT keeps private but this
package needs — adding a ``PeftType`` member, a layer's active-adapter list, the adapters an auxiliary wrapper
holds — is reached only through the functions here, so a PEFT release that changes them is fixed in this file
(supported: peft 0.18–0.21, see ``docs/compatibility.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

__all__ = [
    "PEFT_TYPE_TO_CONFIG_MAPPING",
    "PEFT_TYPE_TO_TUNER_MAPPING",
    "AuxiliaryTrainingWrapper",
    "ModulesToSaveWrapper",
    "add_peft_type",
    "adapter_names_in",
    "cast_adapter_dtype",
    "delete_wrapper_adapter",
    "freeze_non_trainable",
    "has_adapters",
    "move_adapter_to_base_device",
    "set_active_adapters_view",
    "wrap_active_adapters",
]


def add_peft_type(name: str) -> PeftType:
    """Return ``PeftType[NAME]``, adding the member to PEFT's enum if it is missing.

    PEFT only accepts methods whose upper-case name is a member of its ``PeftType`` enum and has no plugin hook
    for adding members, so the member is added at run time. Idempotent.

    Args:
        name: the method name; the member's name and value are its upper-case form.
    """
    value = name.upper()
    if value in PeftType._value2member_map_:
        return PeftType._value2member_map_[value]
    member = str.__new__(PeftType, value)
    member._name_ = value
    member._value_ = value
    member.__objclass__ = PeftType
    PeftType._member_map_[value] = member
    PeftType._value2member_map_[value] = member
    PeftType._member_names_.append(value)
    # Attribute access (PeftType.NAME) goes through the class dict on some Python versions.
    type.__setattr__(PeftType, value, member)
    return member


def set_active_adapters_view(module: nn.Module, view: Sequence[str]) -> None:
    """Make a tuner layer or auxiliary wrapper read its active adapters from ``view`` and enable it.

    PEFT's layers only iterate their private ``_active_adapter`` list, so a live view there switches every
    tuner type at once.

    Args:
        module: a ``BaseTunerLayer`` or PEFT ``AuxiliaryTrainingWrapper``.
        view: a sequence of adapter names that reflects the current activation.
    """
    module._active_adapter = view
    module._disable_adapters = False


def wrap_active_adapters(module: nn.Module, wrap) -> None:
    """Replace a tuner layer's or auxiliary wrapper's active-adapter list by ``wrap(current list)``, leaving its
    enabled/disabled state alone (``wrap`` may return the list unchanged).

    Args:
        module: a ``BaseTunerLayer`` or PEFT ``AuxiliaryTrainingWrapper``.
        wrap: called with the current list (a one-name string becomes a one-item list).
    """
    current = module._active_adapter
    module._active_adapter = wrap([current] if isinstance(current, str) else current)


def adapter_names_in(module: nn.Module) -> set[str]:
    """Names of the adapters that have weights in a tuner layer or auxiliary wrapper.

    Args:
        module: a ``BaseTunerLayer`` or PEFT ``AuxiliaryTrainingWrapper``.
    """
    if isinstance(module, BaseTunerLayer):
        return set(module._all_available_adapter_names())
    if isinstance(module, AuxiliaryTrainingWrapper):
        return set(module._adapters)
    return set()


def has_adapters(module: nn.Module) -> bool:
    """Whether a tuner layer or auxiliary wrapper still holds any adapter.

    Args:
        module: a ``BaseTunerLayer`` or PEFT ``AuxiliaryTrainingWrapper``.
    """
    if isinstance(module, BaseTunerLayer):
        return bool(module._get_available_adapters())
    return bool(adapter_names_in(module))


def delete_wrapper_adapter(wrapper: AuxiliaryTrainingWrapper, adapter_name: str) -> None:
    """Delete one adapter's copy from a ``modules_to_save`` / trainable-tokens wrapper, activating none."""
    wrapper.delete_adapter(adapter_name, new_active_adapters=[])


def freeze_non_trainable(layer: BaseTunerLayer) -> None:
    """Let a PEFT layer re-freeze the weights it keeps frozen (e.g. AdaLoRA's), if its class has that step."""
    # looked up on the class: this package's layers forward unknown attributes to the modules they wrap
    freeze = getattr(type(layer), "_freeze_non_trainable_peft_weights", None)
    if freeze is not None:
        freeze(layer)


def cast_adapter_dtype(tuner, adapter_name: str, autocast_adapter_dtype: bool) -> None:
    """What ``PeftModel`` does after injecting an adapter: upcast its float16/bfloat16 weights to float32 (or not).

    Args:
        tuner: the ``BaseTuner`` that injected the adapter.
        adapter_name: the adapter.
        autocast_adapter_dtype: PEFT's flag; False keeps the dtype the weights were made in.
    """
    cast = getattr(type(tuner), "_cast_adapter_dtype", None)
    if cast is not None:
        cast(tuner, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def move_adapter_to_base_device(layer: BaseTunerLayer, adapter_name: str) -> None:
    """Put one adapter's weights (just created) on the device (and floating dtype) of the module the layer wraps."""
    layer._move_adapter_to_device_of_base_layer(adapter_name)
