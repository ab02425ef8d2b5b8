"""Which adapters are active: one set for the whole process, or one set per thread.

Every tuner layer in a :class:`~peft_swift_ext.SwiftModel` reads its active adapters through an
:class:`ActiveAdapterView` installed as the layer's ``_active_adapter``. PEFT's layers (LoRA, DoRA,
AdaLoRA, ...) only iterate that value, so one shared state switches every tuner type at once, and the
per-thread mode needs no change to any layer's forward.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Iterator, Sequence

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..compat import AuxiliaryTrainingWrapper, adapter_names_in, set_active_adapters_view


def per_thread_from_env() -> bool:
    """SWIFT's switch: ``USE_UNIQUE_THREAD=0`` makes activation per thread (default ``1``: shared)."""
    return os.environ.get("USE_UNIQUE_THREAD", "1").strip() == "0"


class ActivationState:
    """The set of active adapter names, shared or thread-local.

    Args:
        per_thread: when True each thread has its own set, and a thread that never set one has none.
    """

    def __init__(self, per_thread: bool = False) -> None:
        self.per_thread = per_thread
        self._shared: tuple[str, ...] = ()
        self._local = threading.local()

    def current(self) -> tuple[str, ...]:
        """The active adapter names for the calling thread, in activation order."""
        if self.per_thread:
            return self._local.__dict__.get("active", ())
        return self._shared

    def set(self, names: Iterable[str]) -> None:
        """Replace the active set (for the calling thread in per-thread mode).

        Args:
            names: the adapters to make active, in order (duplicates dropped).
        """
        names = tuple(dict.fromkeys(names))
        if self.per_thread:
            self._local.active = names
        else:
            self._shared = names

    def activate(self, name: str) -> None:
        """Append an adapter to the active set (no-op if already active).

        Args:
            name: the adapter to activate.
        """
        if name not in self.current():
            self.set((*self.current(), name))

    def deactivate(self, name: str) -> None:
        """Remove an adapter from the active set (no-op if inactive).

        Args:
            name: the adapter to deactivate.
        """
        self.set(n for n in self.current() if n != name)


class ActiveAdapterView(Sequence):
    """A read-only list of the active adapters that always reflects an :class:`ActivationState`.

    Args:
        state: the shared activation state.
        owner: for modules that must only see their own adapters (PEFT's ``modules_to_save`` wrappers,
            which fall back to the original module when an active adapter has no copy), the module whose
            ``_adapters`` set filters the names.
    """

    __slots__ = ("state", "owner")

    def __init__(self, state: ActivationState, owner: nn.Module | None = None) -> None:
        self.state = state
        self.owner = owner

    def _names(self) -> tuple[str, ...]:
        names = self.state.current()
        if self.owner is None:
            return names
        owned = adapter_names_in(self.owner)
        return tuple(name for name in names if name in owned)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __getitem__(self, index):
        names = self._names()[index]
        # PEFT copies the list with [:] and then mutates the copy
        return list(names) if isinstance(index, slice) else names

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, (list, tuple, Sequence)) and list(self._names()) == list(other)

    def __repr__(self) -> str:
        return f"ActiveAdapterView({list(self._names())})"


def install_view(model: nn.Module, state: ActivationState) -> None:
    """Make every tuner layer of ``model`` read its active adapters from ``state``.

    PEFT code paths such as ``update_layer`` or ``delete_adapter`` overwrite a layer's active list, so this
    is re-run after every change to the set of adapters.
    """
    shared = ActiveAdapterView(state)
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            set_active_adapters_view(module, shared)
        elif isinstance(module, AuxiliaryTrainingWrapper):
            set_active_adapters_view(module, ActiveAdapterView(state, owner=module))
