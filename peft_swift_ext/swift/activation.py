"""Which adapters are active: one set for the whole process, one per thread / asyncio task, or one per block.

Every tuner layer in a :class:`~peft_swift_ext.SwiftModel` reads its active adapters through an
:class:`ActiveAdapterView` installed as the layer's active-adapter list. PEFT's layers (LoRA, DoRA, AdaLoRA, ...)
only iterate that value, so one state switches every tuner type at once, and neither the per-thread mode nor a
scoped selection needs any change to a layer's forward.

The per-thread set and scoped selections live in ``contextvars``: a new thread starts with none, an asyncio task
starts with the selection of the code that created it, and changes made inside a thread or task stay there.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Iterable, Iterator

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..compat import AuxiliaryTrainingWrapper, adapter_names_in, set_active_adapters_view
from ..core.scope import LiveAdapterList


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
        # a nested read, or one inside this thread's own change, is already safe
        shared = not depth and self._writer != threading.get_ident()
        if shared:
            with self._condition:
                while self._writer is not None or self._waiting_writers:
                    self._condition.wait()
                self._readers += 1
        self._local.reads = depth + 1
        try:
            yield
        finally:
            self._local.reads = depth
            if shared:
                with self._condition:
                    self._readers -= 1
                    if not self._readers:
                        self._condition.notify_all()

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
    """The active adapter names (shared by the process, per thread / task, or chosen for one block), and the lock
    that keeps forwards off half-built layers (:class:`StructureLock`).

    Args:
        per_thread: when True each thread (and each asyncio task) has its own set, and one that never set it
            has none (SWIFT's ``USE_UNIQUE_THREAD=0``).
    """

    def __init__(self, per_thread: bool = False) -> None:
        self.per_thread = per_thread
        self._shared: tuple[str, ...] = ()
        #: forwards hold it shared, changes to the adapters' layers alone
        self.structure = StructureLock()
        self._new_context_vars()

    def _new_context_vars(self) -> None:
        # one pair per state object: two models never see each other's selections
        self._local: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar("active_adapters", default=())
        self._scope: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
            "scoped_adapters", default=None
        )
        # Set by the first scoped() block on this state: current() reads the context variable only from then on,
        # since torch.compile cannot trace ContextVar.get (a graph break in every layer) but traces a bool
        # attribute. Never cleared: a task started inside a block keeps the block's selection after it ends.
        self._scopes_used = False

    def current(self) -> tuple[str, ...]:
        """The active adapter names for the calling context, in activation order."""
        scoped = self._scope.get() if self._scopes_used else None  # see _new_context_vars: compile-friendly
        if scoped is not None:
            return scoped
        return self._local.get() if self.per_thread else self._shared

    def set(self, names: Iterable[str]) -> None:
        """Replace the active set: inside a :meth:`scoped` block for that block only, else for the calling thread
        or task in per-thread mode, else for the process.

        Args:
            names: the adapters to make active, in order (duplicates dropped).
        """
        names = tuple(dict.fromkeys(names))
        if self._scopes_used and self._scope.get() is not None:
            self._scope.set(names)
        elif self.per_thread:
            self._local.set(names)
        else:
            self._shared = names

    @contextlib.contextmanager
    def scoped(self, names: Iterable[str]) -> Iterator[None]:
        """Inside the block, the calling thread or task (and the tasks it starts) sees exactly ``names``."""
        token = self._scope.set(tuple(dict.fromkeys(names)))
        self._scopes_used = True
        try:
            yield
        finally:
            self._scope.reset(token)

    def activate(self, name: str) -> None:
        """Append an adapter to the active set (no-op if already active)."""
        if name not in self.current():
            self.set((*self.current(), name))

    def deactivate(self, name: str) -> None:
        """Remove an adapter from the active set (no-op if inactive)."""
        self.set(n for n in self.current() if n != name)

    def __getstate__(self) -> dict:
        # Context variables cannot be copied or pickled: a copy keeps the mode, the shared set and the copying
        # thread's own set; selections of other threads, tasks and blocks stay with the original. A copied model
        # starts unlocked: locks and their waiters belong to the original.
        return {"per_thread": self.per_thread, "shared": self._shared, "mine": self._local.get()}

    def __setstate__(self, state: dict) -> None:
        self.per_thread = state["per_thread"]
        self._shared = state["shared"]
        self.structure = StructureLock()
        self._new_context_vars()
        self._local.set(state["mine"])


class ActiveAdapterView(LiveAdapterList):
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
