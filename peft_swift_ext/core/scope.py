"""Adapters chosen for one block of code: ``with peft_model.adapters("a", "b"):`` on a PeftModel of this package.

The choice lives in a ``contextvars`` value, so concurrent threads and asyncio tasks each run their own adapters
on one model. It is keyed by a token each tuner gives its layers, so two models never see each other's choice.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator, Sequence

_SCOPES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("scoped_adapters", default=None)
# Blocks open in the process: layers read the context variable only when one is (torch.compile cannot trace
# ContextVar.get, but traces a module-level int, so a forward outside any block stays one graph).
_OPEN = 0
_OPEN_LOCK = threading.Lock()


class ScopeToken:
    """Identifies one tuner's layers in a scope (copied along with the model, so a copy has its own)."""

    __slots__ = ()


@contextlib.contextmanager
def scoped(token: ScopeToken, names: Sequence[str]) -> Iterator[None]:
    """Inside the block, the layers carrying ``token`` run exactly ``names`` (in order) for the calling context.

    Args:
        token: the tuner's token.
        names: the adapters to run.
    """
    global _OPEN
    current = _SCOPES.get() or {}
    reset = _SCOPES.set({**current, token: tuple(dict.fromkeys(names))})
    with _OPEN_LOCK:
        _OPEN += 1
    try:
        yield
    finally:
        with _OPEN_LOCK:
            _OPEN -= 1
        _SCOPES.reset(reset)


def scoped_adapters(token: ScopeToken | None) -> tuple[str, ...] | None:
    """The adapters chosen for ``token`` in the calling context, or None when no scope chose them.

    Args:
        token: a layer's token (None: the layer is in no tuner that scopes).
    """
    scopes = _SCOPES.get() if _OPEN else None
    return None if scopes is None or token is None else scopes.get(token)
