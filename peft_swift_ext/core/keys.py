"""Where each adapter's tensors live in a model, and their keys in SWIFT and PEFT checkpoints.

One enumeration serves saving, loading (under any name), offloading and parameter grouping, for PEFT's
own tuners and for ours alike: every tuner layer keeps per-adapter containers (``lora_A[name]``,
``adapter_down[name]``, ...), and PEFT's ``modules_to_save`` wrappers keep one module copy per adapter.

Keys are canonical: ``.base_layer`` segments are dropped, so a LoRA that sits inside another tuner's
wrapper saves and loads with the same keys as a LoRA on the bare module (and as ms-swift writes them).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..compat import ModulesToSaveWrapper
from .paths import canonical_path

PEFT_KEY_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Slot:
    """One tensor of one adapter, independent of the adapter's name.

    Args:
        path: canonical path of the module that owns the container.
        attr: the container attribute (``lora_A``, ``modules_to_save``, ...).
        rest: the tensor's path inside the adapter's entry (``weight``), empty for a bare parameter.
        named: whether checkpoint keys carry the adapter name (False for ``modules_to_save`` copies,
            which both SWIFT and PEFT save under the original module's keys).
        required: whether a checkpoint must provide it (False for bookkeeping tensors such as AdaLoRA's
            ``ranknum`` that PEFT does not save).
    """

    path: str
    attr: str
    rest: str
    named: bool = True
    required: bool = True

    def swift_key(self, adapter_name: str) -> str:
        """The key in a SWIFT-layout checkpoint (adapter name kept, no ``base_model.`` prefix)."""
        return _join(self.path, self.attr, adapter_name, self.rest) if self.named else _join(self.path, self.rest)

    def peft_key(self) -> str:
        """The key in a PEFT-layout checkpoint (adapter name removed, ``base_model.model.`` prefix)."""
        return PEFT_KEY_PREFIX + _join(self.path, self.attr if self.named else "", self.rest)


def _join(*parts: str) -> str:
    return ".".join(part for part in parts if part)


def tuner_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, module)`` of every module that holds per-adapter containers (tuner layers, modules_to_save)."""
    return [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, (BaseTunerLayer, ModulesToSaveWrapper))
    ]


def adapter_containers(
    modules: list[tuple[str, nn.Module]], adapter_name: str
) -> Iterator[tuple[str, nn.Module, str, object, bool]]:
    """Yield ``(module path, owning module, container attribute, entry, required)`` for one adapter.

    Args:
        modules: the model's tuner modules, as :func:`tuner_modules` lists them.
        adapter_name: the adapter to look for.
    """
    for path, module in modules:
        if isinstance(module, BaseTunerLayer):
            for attr in (*module.adapter_layer_names, *module.other_param_names):
                container = getattr(module, attr, None)
                weights = isinstance(container, (nn.ModuleDict, nn.ParameterDict))  # BufferDicts: never required
                if (weights or _is_buffer_dict(container)) and adapter_name in container:
                    yield path, module, attr, container[adapter_name], weights and attr in module.adapter_layer_names
        elif adapter_name in module.modules_to_save:
            yield path, module, "modules_to_save", module.modules_to_save[adapter_name], True


def _is_buffer_dict(container: object) -> bool:
    return type(container).__name__ == "BufferDict" and isinstance(container, nn.Module)


def adapter_tensors(model: nn.Module, adapter_name: str) -> dict[Slot, tuple[str, torch.Tensor]]:
    """Every tensor (parameters and persistent buffers) of ``adapter_name`` in ``model``.

    Returns a mapping from :class:`Slot` to ``(state-dict key in model, tensor)``.
    """
    tensors: dict[Slot, tuple[str, torch.Tensor]] = {}
    for path, _module, attr, entry, required in adapter_containers(tuner_modules(model), adapter_name):
        named = attr != "modules_to_save"
        base = canonical_path(path)
        prefix = _join(path, attr, adapter_name)
        if isinstance(entry, torch.Tensor):
            tensors[Slot(base, attr, "", named, required)] = (prefix, entry)
            continue
        for rest, tensor in entry.state_dict(keep_vars=True).items():
            tensors[Slot(base, attr, rest, named, required)] = (_join(prefix, rest), tensor)
    return tensors
