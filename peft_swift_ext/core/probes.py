"""Forward hooks that hand other modules' features to a tuner layer, per adapter and per thread.

Res-Tuning reads features of its root and stem modules, and SCEdit's controllable variant reads hint
features, in the same forward in which the tuner layer runs. The hooks are owned by the tuner layer
(one set per adapter) and removed with the adapter; captured tensors live in a thread-local store and
are dropped as soon as the layer takes them, so concurrent forwards never see each other's features
and nothing is kept alive between forwards.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .paths import module_at
from .slots import first_argument, first_tensor


@dataclass(frozen=True)
class ProbeSource:
    """One feature to capture.

    Args:
        name: the module's path in the model (for error messages).
        module: the module to hook.
        where: ``"input"`` (first argument of its forward) or ``"output"`` (its output, or the first element).
    """

    name: str
    module: nn.Module
    where: str


class FeatureProbes:
    """Hooks capturing features of some modules for the adapters of one tuner layer.

    Args:
        detach: cut captured features from the autograd graph (Res-Tuning's bypass) or keep them
            attached (hint features, which may come from a trainable hint encoder).
    """

    def __init__(self, detach: bool) -> None:
        self.detach = detach
        # hook ids rather than handles: a deep copy of the model keeps the ids, in the copied modules
        self._hook_ids: dict[str, list[int]] = {}
        self._sources: dict[str, list[ProbeSource]] = {}
        self._local = threading.local()

    def attach(self, adapter_name: str, sources: list[ProbeSource], wanted: Callable[[str], bool]) -> None:
        """Hook ``sources`` for ``adapter_name``; features are captured only while ``wanted(adapter_name)``.

        ``wanted`` should be a bound method of the tuner layer, so that a deep copy of the model gets hooks
        bound to the copied layer.
        """
        self.remove(adapter_name)
        hook_ids = []
        for slot, source in enumerate(sources):
            hook = _CaptureHook(self, adapter_name, slot, wanted)
            hook_ids.append(_register(source, hook.before if source.where == "input" else hook.after))
        self._hook_ids[adapter_name] = hook_ids
        self._sources[adapter_name] = list(sources)

    def follow(self, model: nn.Module, owner: nn.Module) -> None:
        """Move every hook to the module that answers at its source's path now: the outermost layer there.

        A feature is what the model gets from a module, so its hook sits on the outermost tuner layer wrapping
        that module; layers put around it or taken away later, by any tuner and in any order, move the hook
        (without this a hook stays on a layer that was unwrapped and never runs again, or misses a later one).
        Where the source is the reading layer's own target, the feature is what that layer wraps: the layer
        itself runs on it, so it cannot read its own result. ``owner`` is the layer these probes feed; the source paths
        are relative to ``model``.
        """
        for adapter_name, sources in self._sources.items():
            hook_ids = self._hook_ids[adapter_name]
            for slot, (source, hook_id) in enumerate(zip(sources, hook_ids)):
                current = _reader_side(module_at(model, source.name), owner)
                if current is source.module:
                    continue
                hook = _hooks_of(source)[hook_id]  # the callable itself: in a deep copy, bound to the copy
                _remove_hook(source.module, hook_id)
                moved = ProbeSource(source.name, current, source.where)
                hook_ids[slot] = _register(moved, hook)
                sources[slot] = moved

    def _store(self, adapter_name: str, slot: int, tensor: torch.Tensor) -> None:
        store = self._local.__dict__.setdefault("features", {})
        store.setdefault(adapter_name, {})[slot] = tensor.detach() if self.detach else tensor

    def take(self, adapter_name: str, consumer: str) -> list[torch.Tensor]:
        """Remove and return this thread's captured features of ``adapter_name``, in source order.

        Raises ``RuntimeError`` naming the source that has not run in this forward yet.

        Args:
            adapter_name: the adapter.
            consumer: the module that needs them (for the error message).
        """
        captured = self._local.__dict__.get("features", {}).pop(adapter_name, {})
        sources = self._sources.get(adapter_name, [])
        missing = [source.name for slot, source in enumerate(sources) if slot not in captured]
        if missing:
            raise RuntimeError(
                f"adapter {adapter_name!r} at '{consumer}' needs the features of {missing}, but they did not run "
                "before it in this forward; the modules it reads from must run before it"
            )
        return [captured[slot] for slot in range(len(sources))]

    def remove(self, adapter_name: str | None = None) -> None:
        """Remove the hooks of one adapter, or of all adapters."""
        names = list(self._hook_ids) if adapter_name is None else [adapter_name]
        for name in names:
            for source, hook_id in zip(self._sources.pop(name, []), self._hook_ids.pop(name, [])):
                _remove_hook(source.module, hook_id)

    def __getstate__(self) -> dict:
        # the per-thread store of captured features cannot be pickled, and holds nothing between forwards
        return {key: value for key, value in self.__dict__.items() if key != "_local"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def __deepcopy__(self, memo: dict) -> FeatureProbes:
        # The copied modules hold deep copies of the hooks, under the same ids, bound to the copied probes
        # through ``memo``; only the per-thread store (which cannot be copied) starts empty.
        copied = FeatureProbes(self.detach)
        memo[id(self)] = copied
        for name, sources in self._sources.items():
            copied._sources[name] = [ProbeSource(s.name, copy.deepcopy(s.module, memo), s.where) for s in sources]
            copied._hook_ids[name] = list(self._hook_ids[name])
        return copied


class _CaptureHook:
    """The hook callables of one source; a class (not a closure) so that deep copies rebind to the copy."""

    def __init__(self, probes: FeatureProbes, adapter_name: str, slot: int, wanted: Callable[[str], bool]) -> None:
        self.probes = probes
        self.adapter_name = adapter_name
        self.slot = slot
        self.wanted = wanted

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.wanted(self.adapter_name):
            self.probes._store(self.adapter_name, self.slot, first_tensor(first_argument(module, args, kwargs)))

    def after(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.wanted(self.adapter_name):
            self.probes._store(self.adapter_name, self.slot, first_tensor(output))


def _reader_side(outermost: nn.Module, owner: nn.Module) -> nn.Module:
    """``outermost``, or what ``owner`` wraps when ``owner`` is one of the layers stacked there."""
    module = outermost
    while module is not owner and isinstance(module, BaseTunerLayer):
        module = module.base_layer
    return owner.base_layer if module is owner else outermost


def _register(source: ProbeSource, hook: Callable) -> int:
    """Register ``hook`` on the module of ``source`` (a pre-hook with kwargs for inputs); returns its id."""
    if source.where == "input":
        return source.module.register_forward_pre_hook(hook, with_kwargs=True).id
    return source.module.register_forward_hook(hook).id


def _hooks_of(source: ProbeSource) -> dict[int, Callable]:
    """The hook dict of the module of ``source`` that its kind of hook is registered in."""
    return source.module._forward_pre_hooks if source.where == "input" else source.module._forward_hooks


def _remove_hook(module: nn.Module, hook_id: int) -> None:
    """Remove forward (pre-)hook ``hook_id`` from every dict torch registers one in (hook ids are unique)."""
    pre_hooks = (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs)
    hooks = (module._forward_hooks, module._forward_hooks_with_kwargs, module._forward_hooks_always_called)
    for registry in (*pre_hooks, *hooks):
        registry.pop(hook_id, None)
