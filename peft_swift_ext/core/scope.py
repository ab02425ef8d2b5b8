"""Adapters chosen for one block of code: ``with peft_model.adapters("a", "b"):`` on a PeftModel of this package.

The choice lives in a ``contextvars`` value, so concurrent threads and asyncio tasks each run their own adapters
on one model. It is keyed by a token each tuner gives its layers, so two models never see each other's choice.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

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
    """Inside the block, the layers carrying ``token`` run exactly ``names`` (in order) for the calling context.

    Args:
        token: the tuner's token.
        names: the adapters to run.
    """
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
