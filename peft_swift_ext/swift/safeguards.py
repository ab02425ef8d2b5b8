"""What keeps a load from changing the model unless it succeeds, and its errors naming the file at fault."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import PeftConfig
from torch import nn

from ..core.paths import canonical_path

#: LoRA initialisers (``init_lora_weights``) that write into the base weights; ``pissa_niter_<n>`` included.
BASE_REWRITING_INITIALISERS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@contextlib.contextmanager
def base_rewriting_initialisers_off(config: PeftConfig) -> Iterator[None]:
    """Inside the block, ``config.init_lora_weights`` does not rewrite the base weights (the checkpoint's
    weights are loaded next, so plain initial values serve); the config keeps its value for saving.

    Args:
        config: the adapter's config, about to be injected for a load.
    """
    value = getattr(config, "init_lora_weights", None)
    if not (isinstance(value, str) and value.lower().startswith(BASE_REWRITING_INITIALISERS)):
        yield
        return
    config.init_lora_weights = False
    try:
        yield
    finally:
        config.init_lora_weights = value


class BaseTensors:
    """The tensor objects and storages every module of ``model`` holds now, to find and undo replacements
    (``weight.data = ...`` or a new ``Parameter``) made by an injection.

    Keeping a reference to each tensor's data costs nothing unless it is replaced (then the old storage stays
    alive until the guard is dropped, which is what makes it restorable).
    """

    def __init__(self, model: nn.Module) -> None:
        self._entries: list[tuple[str, dict, str, torch.Tensor, torch.Tensor, int]] = []
        for path, module in model.named_modules():
            for store in (module._parameters, module._buffers):
                for name, tensor in store.items():
                    if tensor is not None:
                        key = canonical_path(f"{path}.{name}" if path else name)
                        self._entries.append((key, store, name, tensor, tensor.data, tensor.data_ptr()))

    def changed(self) -> list[str]:
        """Canonical keys of the base tensors that were replaced since the record was taken."""
        return [
            key
            for key, store, name, tensor, _, pointer in self._entries
            if store.get(name) is not tensor or tensor.data_ptr() != pointer
        ]

    def restore(self) -> None:
        """Put every replaced tensor (and replaced storage) back."""
        for _, store, name, tensor, data, pointer in self._entries:
            if store.get(name) is not tensor:
                store[name] = tensor
            if tensor.data_ptr() != pointer:
                tensor.data = data


@contextlib.contextmanager
def named_errors(source: Path | str, what: str) -> Iterator[None]:
    """Re-raise any error of the block as ``ValueError`` naming ``source`` (errors naming it already pass).

    A config field with a hostile value (a huge rank, a wrong type PEFT does not check, a negative size) fails
    somewhere inside PEFT or torch with ``TypeError``, ``RuntimeError``, ``OverflowError``...; callers are
    promised a ``ValueError`` that names the file (the original error is chained).
    """
    try:
        yield
    except ValueError as error:
        if str(source) in str(error):
            raise
        raise ValueError(f"{source}: {what}: {error}") from error
    except Exception as error:  # TypeError, RuntimeError, OverflowError, ImportError...: the file is at fault
        raise ValueError(f"{source}: {what}: {type(error).__name__}: {error}") from error
