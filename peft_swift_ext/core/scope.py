"""Adapters chosen for one block of code: ``with peft_model.adapters("a", "b"):`` on a PeftModel of this package.

The choice lives in a ``contextvars`` value, so concurrent threads and asyncio tasks each run their own adapters
on one model. It is keyed by a token each tuner gives its layers, so two models never see each other's choice.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterable, Iterator, Sequence

_SCOPES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("scoped_adapters", default=None)


class ScopeToken:
    """Identifies one tuner's layers in a scope (copied along with the model, so a copy has its own).

    ``used`` turns true with the first block opened for it: its layers read the context variable only from then
    on, since torch.compile cannot trace ``ContextVar.get`` but traces an attribute, so a model never scoped stays
    one graph. It is never cleared: a task started inside a block keeps the block's choice after the block ends.
    """

    __slots__ = ("used",)

    def __init__(self) -> None:
        self.used = False


@contextlib.contextmanager
def scoped(token: ScopeToken, names: Sequence[str]) -> Iterator[None]:
    """Inside the block, the layers carrying ``token`` run exactly ``names`` (in order) for the calling context."""
    current = _SCOPES.get() or {}
    reset = _SCOPES.set({**current, token: tuple(dict.fromkeys(names))})
    token.used = True
    try:
        yield
    finally:
        _SCOPES.reset(reset)


def scoped_adapters(token: ScopeToken | None) -> tuple[str, ...] | None:
    """The adapters chosen for ``token`` in the calling context, or None when no scope chose them.

    Args:
        token: a layer's token (None: the layer is in no tuner that scopes).
    """
    if token is None or not token.used:
        return None
    scopes = _SCOPES.get()
    return None if scopes is None else scopes.get(token)


class ScopedAdapters:
    """Mixin for a tuner model (PEFT's ``BaseTuner``): ``peft_model.adapters("a", "b")`` scopes its adapters.

    This package's own layers read the scope themselves; a tuner whose layers are PEFT's (LoRA+, LongLoRA)
    overrides :meth:`_prepare_scopes` to give them :class:`ScopedActiveAdapters` lists.
    """

    @property
    def scope_token(self) -> ScopeToken:
        """The token this tuner's layers carry, so that :meth:`adapters` scopes them alone."""
        token = self.__dict__.get("_scope_token")
        if token is None:
            token = self.__dict__["_scope_token"] = ScopeToken()
        return token

    @contextlib.contextmanager
    def adapters(self, *adapter_names: str) -> Iterator[None]:
        """Inside the block, the calling thread or asyncio task (and the tasks it starts) runs exactly these adapters.

        Reached as ``peft_model.adapters("a", "b")``. Other threads and tasks keep their own adapters, so concurrent
        requests can each use theirs on one model; nothing is moved, and ``set_adapter`` outside is unaffected.

        Args:
            *adapter_names: the adapters to run, in order (none: the base model alone).
        """
        unknown = [name for name in adapter_names if name not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; this model has {list(self.peft_config)}")
        self._prepare_scopes()
        with scoped(self.scope_token, adapter_names):
            yield

    def _prepare_scopes(self) -> None:
        """Make the layers able to follow a scope (nothing to do for layers that read it themselves)."""


class LiveAdapterList(Sequence):
    """Base of the live lists this package puts in PEFT layers' ``_active_adapter``: the names come from
    :meth:`_names` at each use, and the list answers every way PEFT uses its plain list there (iterating, indexing,
    slicing and then mutating the copy, ``in``, ``==``, and concatenating with lists, as the trainable-tokens layer
    does with its merged adapters).
    """

    __slots__ = ()

    def _names(self) -> Sequence[str]:
        raise NotImplementedError

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

    def __add__(self, other: Iterable[str]) -> list[str]:
        return [*self._names(), *other]

    def __radd__(self, other: Iterable[str]) -> list[str]:
        return [*other, *self._names()]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and list(self._names()) == list(other)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self._names())})"


class ScopedActiveAdapters(LiveAdapterList):
    """A PEFT layer's active-adapter list that gives the calling context's scope while one is open for ``token``,
    and otherwise the list the layer had (``fallback``). PEFT's layers read it as their own list, so the scope
    reaches them without changing any shared state.
    """

    __slots__ = ("token", "fallback")

    def __init__(self, token: ScopeToken, fallback: Sequence[str]) -> None:
        self.token = token
        self.fallback = list(fallback)

    def _names(self) -> Sequence[str]:
        scoped_names = scoped_adapters(self.token)
        return self.fallback if scoped_names is None else scoped_names
