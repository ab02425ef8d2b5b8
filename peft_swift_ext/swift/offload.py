"""Moving an inactive adapter's weights off the accelerator and back, bit-exact.

``'cpu'`` moves the adapter's tensors to host memory. ``'meta'`` writes them to a safetensors file in a
private temporary folder and leaves meta tensors in the model, so the adapter holds no memory at all until
it is activated again. Tensors are swapped in place in their modules (no ``Module.to`` walk), and the
store is written and read in one call, which keeps a round trip for a 30-layer LoRA in milliseconds.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.keys import adapter_containers
from ..core.sharding import is_sharded

OFFLOAD_TARGETS = ("cpu", "meta")


@dataclass
class OffloadRecord:
    """Where one adapter's tensors were and, for ``'meta'``, the file holding their values."""

    kind: str
    devices: dict[str, torch.device] = field(default_factory=dict)
    file: Path | None = None


class OffloadStore:
    """Offloads adapters of one model and restores them; owns the temporary files of ``'meta'`` offloads."""

    def __init__(self) -> None:
        self.records: dict[str, OffloadRecord] = {}
        self._folder: Path | None = None

    def is_offloaded(self, adapter_name: str) -> bool:
        """Whether ``adapter_name``'s tensors are currently offloaded (to CPU or the meta device).

        Args:
            adapter_name: the adapter to ask about.
        """
        return adapter_name in self.records

    def offload(self, modules: list[tuple[str, nn.Module]], adapter_name: str, target: str) -> None:
        """Move ``adapter_name``'s tensors to ``target`` (``'cpu'`` or ``'meta'``).

        Args:
            modules: the model's tuner modules (:func:`~peft_swift_ext.swift.keys.tuner_modules`).
            adapter_name: the adapter to move.
            target: ``'cpu'`` or ``'meta'``.
        """
        if target not in OFFLOAD_TARGETS:
            raise ValueError(f"offload must be None, 'cpu' or 'meta', got {target!r}")
        if adapter_name in self.records:
            return
        self.check(modules, adapter_name, target)
        slots = list(_slots(modules, adapter_name))
        record = OffloadRecord(kind=target, devices={key: tensor.device for key, tensor, _ in slots})
        if target == "meta" and slots:
            record.file = self._new_file(adapter_name)
            save_file({key: tensor.detach().cpu().contiguous() for key, tensor, _ in slots}, str(record.file))
            for _, tensor, put in slots:
                put(torch.empty_like(tensor, device="meta"))
        else:
            for _, tensor, put in slots:
                put(tensor.detach().to("cpu"))
        self.records[adapter_name] = record

    def check(self, modules: list[tuple[str, nn.Module]], adapter_name: str, target: str) -> None:
        """Raise a ``ValueError`` if ``adapter_name`` cannot be offloaded: its tensors are sharded across ranks.

        Args:
            modules: the model's tuner modules.
            adapter_name: the adapter to move.
            target: ``'cpu'`` or ``'meta'`` (for the message).
        """
        if adapter_name in self.records:
            return
        sharded = [key for key, tensor, _ in _slots(modules, adapter_name) if is_sharded(tensor)]
        if sharded:
            raise ValueError(
                f"cannot offload adapter {adapter_name!r} to {target!r}: its tensors are sharded across ranks "
                f"(FSDP2 DTensor / DeepSpeed ZeRO-3, e.g. {sharded[0]}), and moving a shard would desynchronise "
                "the ranks; deactivate it without offload, or offload before sharding the model"
            )

    def restore(self, modules: list[tuple[str, nn.Module]], adapter_name: str) -> None:
        """Bring ``adapter_name`` back to the devices it was on, with identical values."""
        record = self.records.pop(adapter_name, None)
        if record is None:
            return
        saved = load_file(str(record.file)) if record.file is not None else {}
        for key, tensor, put in _slots(modules, adapter_name):
            value = saved[key] if record.kind == "meta" else tensor.detach()
            put(value.to(record.devices[key]))
        if record.file is not None:
            record.file.unlink(missing_ok=True)

    @contextmanager
    def restored(self, modules: list[tuple[str, nn.Module]], adapter_name: str) -> Iterator[None]:
        """Inside the block the adapter's tensors are back in place; an offloaded adapter is offloaded again after.

        Args:
            modules: the model's tuner modules.
            adapter_name: the adapter to read.
        """
        record = self.records.get(adapter_name)
        if record is None:
            yield
            return
        self.restore(modules, adapter_name)
        try:
            yield
        finally:
            self.offload(modules, adapter_name, record.kind)

    def forget(self, adapter_name: str) -> None:
        """Drop the record of a deleted adapter."""
        record = self.records.pop(adapter_name, None)
        if record is not None and record.file is not None:
            record.file.unlink(missing_ok=True)

    def _new_file(self, adapter_name: str) -> Path:
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="peft-swift-offload-"))
        return Path(tempfile.mkstemp(prefix=f"{adapter_name}-", suffix=".safetensors", dir=self._folder)[1])

    def __del__(self) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


def _slots(
    modules: list[tuple[str, nn.Module]], adapter_name: str
) -> Iterator[tuple[str, torch.Tensor, Callable[[torch.Tensor], None]]]:
    """``(key, tensor, put)`` for every tensor of the adapter; ``put(value)`` installs a replacement."""
    for path, module, attr, entry, _ in adapter_containers(modules, adapter_name):
        container = module.modules_to_save if attr == "modules_to_save" else getattr(module, attr)
        prefix = f"{path}.{attr}"
        if isinstance(entry, torch.Tensor):
            yield prefix, entry, _setter(container, adapter_name, entry)
            continue
        for owner_name, owner in entry.named_modules():
            for store in (owner._parameters, owner._buffers):
                for name, tensor in store.items():
                    if tensor is not None:
                        yield f"{prefix}/{owner_name}.{name}", tensor, _setter(store, name, tensor)


def _setter(store, name: str, old: torch.Tensor) -> Callable[[torch.Tensor], None]:
    if isinstance(old, nn.Parameter):

        def put(value: torch.Tensor) -> None:
            store[name] = nn.Parameter(value, requires_grad=old.requires_grad)

    else:

        def put(value: torch.Tensor) -> None:
            store[name] = value

    return put
