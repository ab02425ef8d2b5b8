"""Which adapters are active: one set for the whole process, or one set per thread.

Every tuner layer in a :class:`~peft_swift_ext.SwiftModel` reads its active adapters through an
:class:`ActiveAdapterView` installed as the layer's ``_active_adapter``. PEFT's layers (LoRA, DoRA,
AdaLoRA, ...) only iterate that value, so one shared state switches every tuner type at once, and the
per-thread mode needs no change to any layer's forward.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator, Sequence

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..compat import AuxiliaryTrainingWrapper, adapter_names_in, set_active_adapters_view


def per_thread_from_env() -> bool:
    """SWIFT's switch: ``USE_UNIQUE_THREAD=0`` makes activation per thread (default ``1``: shared)."""
    return os.environ.get("USE_UNIQUE_THREAD", "1").strip() == "0"


class StructureLock:
    """Forwards share it; adding, loading or removing adapters takes it alone.

    Injecting an adapter re-wraps modules, takes other tuners' layers out of the tree for a moment, and PEFT
    rewrites each touched layer's active-adapter list until the model re-installs its view: a forward running
    meanwhile in another thread would see a half-built model. Writers wait for running forwards and are
    preferred over new ones. The writing thread may run forwards and nest writes; a thread inside a forward
    that tries to change the adapters gets a ``RuntimeError`` instead of a deadlock.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._waiting_writers = 0
        self._local = threading.local()

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the lock shared (a forward) inside the block."""
        depth = self._local.__dict__.get("reads", 0)
        if depth or self._writer == threading.get_ident():
            self._local.reads = depth + 1  # nested, or inside this thread's own change: already safe
            try:
                yield
            finally:
                self._local.reads = depth
            return
        with self._condition:
            while self._writer is not None or self._waiting_writers:
                self._condition.wait()
            self._readers += 1
        self._local.reads = 1
        try:
            yield
        finally:
            self._local.reads = 0
            with self._condition:
                self._readers -= 1
                if not self._readers:
                    self._condition.notify_all()

    def __getstate__(self) -> dict:
        return {}  # a copied model starts unlocked: locks and their waiters belong to the original

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the lock alone (a change to the adapters' layers) inside the block."""
        me = threading.get_ident()
        if self._writer == me:
            yield
            return
        if self._local.__dict__.get("reads", 0):
            raise RuntimeError("adapters cannot be added, loaded or removed from inside a forward of the same model")
        with self._condition:
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._readers:
                    self._condition.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = me
        try:
            yield
        finally:
            with self._condition:
                self._writer = None
                self._condition.notify_all()


class ActivationState:
    """The set of active adapter names, shared or thread-local, and the lock that keeps forwards off
    half-built layers (:class:`StructureLock`).

    Args:
        per_thread: when True each thread has its own set, and a thread that never set one has none.
    """

    def __init__(self, per_thread: bool = False) -> None:
        self.per_thread = per_thread
        self._shared: tuple[str, ...] = ()
        self._local = threading.local()
        #: forwards hold it shared, changes to the adapters' layers alone
        self.structure = StructureLock()

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
