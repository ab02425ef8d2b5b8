"""Moving an inactive adapter's weights off the accelerator and back, bit-exact.

``'cpu'`` moves the adapter's entries to host memory. ``'meta'`` writes them to a safetensors file in a
private temporary folder (read back memory-mapped) and leaves meta tensors in the model, so the adapter
holds no memory at all until it is activated again.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .keys import adapter_containers

OFFLOAD_TARGETS = ("cpu", "meta")


@dataclass
class OffloadRecord:
    """Where one adapter's entries were and, for ``'meta'``, the file holding their values."""

    kind: str
    devices: dict[str, torch.device] = field(default_factory=dict)
    file: Path | None = None


class OffloadStore:
    """Offloads adapters of one model and restores them; owns the temporary files of ``'meta'`` offloads."""

    def __init__(self) -> None:
        self.records: dict[str, OffloadRecord] = {}
        self._folder: Path | None = None

    def is_offloaded(self, adapter_name: str) -> bool:
        return adapter_name in self.records

    def offload(self, model: nn.Module, adapter_name: str, target: str) -> None:
        """Move ``adapter_name``'s entries to ``target`` (``'cpu'`` or ``'meta'``)."""
        if target not in OFFLOAD_TARGETS:
            raise ValueError(f"offload must be None, 'cpu' or 'meta', got {target!r}")
        if adapter_name in self.records:
            return
        entries = list(_entries(model, adapter_name))
        record = OffloadRecord(kind=target)
        values: dict[str, torch.Tensor] = {}
        for key, _container, _, entry in entries:
            record.devices[key] = _device_of(entry)
            if target == "meta":
                for name, tensor in _tensors(entry).items():
                    values[f"{key}/{name}"] = tensor.detach().to("cpu").contiguous()
        if target == "meta" and values:
            record.file = self._new_file(adapter_name)
            save_file(values, str(record.file))
        for _, container, slot, entry in entries:
            _move(container, slot, entry, torch.device(target))
        self.records[adapter_name] = record

    def restore(self, model: nn.Module, adapter_name: str) -> None:
        """Bring ``adapter_name`` back to the devices it was on, with identical values."""
        record = self.records.pop(adapter_name, None)
        if record is None:
            return
        reader = safe_open(str(record.file), framework="pt") if record.file else None
        for key, container, slot, entry in _entries(model, adapter_name):
            device = record.devices.get(key, torch.device("cpu"))
            if record.kind == "meta":
                saved = {name: reader.get_tensor(f"{key}/{name}") for name in _tensors(entry)}
                _materialise(container, slot, entry, device, saved)
            else:
                _move(container, slot, entry, device)
        if record.file is not None:
            record.file.unlink(missing_ok=True)

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


def _entries(model: nn.Module, adapter_name: str):
    for path, module, attr, entry, _ in adapter_containers(model, adapter_name):
        container = module.modules_to_save if attr == "modules_to_save" else getattr(module, attr)
        yield f"{path}.{attr}", container, adapter_name, entry


def _tensors(entry) -> dict[str, torch.Tensor]:
    if isinstance(entry, torch.Tensor):
        return {"": entry}
    return dict(entry.state_dict(keep_vars=True))


def _device_of(entry) -> torch.device:
    tensors = list(_tensors(entry).values())
    return tensors[0].device if tensors else torch.device("cpu")


def _move(container, slot: str, entry, device: torch.device) -> None:
    if isinstance(entry, nn.Parameter):
        container[slot] = nn.Parameter(entry.data.to(device), requires_grad=entry.requires_grad)
    elif isinstance(entry, torch.Tensor):
        container[slot] = entry.to(device)
    else:
        entry.to(device)


def _materialise(container, slot: str, entry, device: torch.device, saved: dict[str, torch.Tensor]) -> None:
    if isinstance(entry, torch.Tensor):
        value = saved[""].to(device)
        container[slot] = (
            nn.Parameter(value, requires_grad=entry.requires_grad) if isinstance(entry, nn.Parameter) else value
        )
        return
    entry.to_empty(device=device)
    with torch.no_grad():
        for name, tensor in entry.state_dict(keep_vars=True).items():
            tensor.copy_(saved[name])
