"""Moving an inactive adapter's weights off the accelerator and back, bit-exact.

``'cpu'`` moves the adapter's tensors to host memory. ``'meta'`` writes them to a safetensors file in a
private temporary folder and leaves meta tensors in the model, so the adapter holds no memory at all until
it is activated again. Tensors are swapped in place in their modules (no ``Module.to`` walk), and the
store is written and read in one call, which keeps a round trip for a 30-layer LoRA in milliseconds.
Its guarantees (a failed write or read loses nothing, no folder outlives its process) are in docs/reliability.md.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.keys import adapter_containers
from ..core.sharding import is_sharded

try:
    import fcntl
except ImportError:  # not POSIX: folders still go at exit, but a crash's leftovers are not swept
    fcntl = None

OFFLOAD_TARGETS = ("cpu", "meta")
#: Name prefix of the stores' folders in the temporary directory; the owner's pid follows.
OFFLOAD_PREFIX = "peft-swift-offload-"


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
        self._folder: OffloadFolder | None = None
        self._files_made = 0

    def __getstate__(self) -> dict:
        # A copy (deepcopy, pickle, torch.save of the model) carries the offloaded values themselves: sharing the
        # files would let one store's restore delete what the other still needs.
        return {
            "records": {
                name: (record.kind, record.devices, None if record.file is None else record.file.read_bytes())
                for name, record in self.records.items()
            }
        }

    def __setstate__(self, state: dict) -> None:
        self.__init__()
        for name, (kind, devices, payload) in state["records"].items():
            record = OffloadRecord(kind, devices)
            if payload is not None:
                record.file = self._new_file(name)
                record.file.write_bytes(payload)
            self.records[name] = record

    def is_offloaded(self, adapter_name: str) -> bool:
        """Whether ``adapter_name``'s tensors are currently offloaded (to CPU or the meta device)."""
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
            file = self._new_file(adapter_name)
            try:
                save_file({key: tensor.detach().cpu().contiguous() for key, tensor, _ in slots}, str(file))
            except BaseException:
                file.unlink(missing_ok=True)  # a full disk: nothing was moved, nothing is left behind
                raise
            record.file = file
            for _, tensor, put in slots:
                put(torch.empty_like(tensor, device="meta"))
        else:
            for _, tensor, put in slots:
                put(tensor.detach().to("cpu"))
        self.records[adapter_name] = record

    def check(self, modules: list[tuple[str, nn.Module]], adapter_name: str, target: str) -> None:
        """Raise a ``ValueError`` if ``adapter_name`` cannot be offloaded: its tensors are sharded across ranks."""
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
        """Bring ``adapter_name`` back to the devices it was on, with identical values.

        Retryable: the record and its file are dropped only once every tensor is back, so a failed read (an I/O
        error, no file descriptor left, a full device) leaves the adapter offloaded and a later call restores it.
        """
        record = self.records.get(adapter_name)
        if record is None:
            return
        slots = list(_slots(modules, adapter_name))
        saved: dict[str, torch.Tensor] = {}
        if record.file is not None:
            try:
                saved = load_file(str(record.file))
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"the offloaded weights of adapter {adapter_name!r} ({record.file}) are gone: the file was "
                    "removed while the adapter was offloaded to 'meta'"
                ) from None
            missing = [key for key, _, _ in slots if key not in saved]
            if missing:
                raise ValueError(f"{record.file} lacks offloaded tensors of adapter {adapter_name!r}: {missing[:4]}")
        # every value first: a failure here (out of memory on the device) leaves the adapter offloaded
        values = [
            (put, (saved[key] if record.kind == "meta" else tensor.detach()).to(record.devices[key]))
            for key, tensor, put in slots
        ]
        for put, value in values:
            put(value)
        del self.records[adapter_name]
        if record.file is not None:
            record.file.unlink(missing_ok=True)

    @contextmanager
    def restored(self, modules: list[tuple[str, nn.Module]], adapter_name: str) -> Iterator[None]:
        """Inside the block the adapter's tensors are back in place; an offloaded adapter is offloaded again after."""
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
            self._folder = OffloadFolder()
        self._files_made += 1
        return self._folder.path / f"{adapter_name}-{self._files_made}.safetensors"


class OffloadFolder:
    """A private temporary folder for one store's files, removed when the store goes or the interpreter exits.

    While it exists it is ``flock``-ed, which keeps temp cleaners that honour locks (systemd-tmpfiles) out of it
    and tells other processes its owner lives. A process killed before it could clean up leaves the folder
    behind; the next folder created on the machine removes it (its lock is free and the process its name
    carries is gone).
    """

    def __init__(self) -> None:
        sweep_dead_offload_folders()
        self.path = Path(tempfile.mkdtemp(prefix=f"{OFFLOAD_PREFIX}{os.getpid()}-"))
        fd = os.open(self.path, os.O_RDONLY)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                pass  # no locks on this file system: the folder still goes at exit
        # one descriptor per store, closed with the folder (a finalizer also runs at interpreter exit)
        self._cleanup = weakref.finalize(self, _remove_folder, self.path, fd)


def _remove_folder(path: Path, fd: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    os.close(fd)


def sweep_dead_offload_folders() -> list[Path]:
    """Remove the offload folders that killed processes left in the temporary directory; return them."""
    if fcntl is None:
        return []
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{OFFLOAD_PREFIX}*"):
        pid = folder.name[len(OFFLOAD_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _process_alive(int(pid)) or folder.is_symlink() or not folder.is_dir():
            continue
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # held: a live process in another pid namespace
        else:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            os.close(fd)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by someone else
        return True
    return True


def _slots(
    modules: list[tuple[str, nn.Module]], adapter_name: str
) -> Iterator[tuple[str, torch.Tensor, Callable[[torch.Tensor], None]]]:
    """``(key, tensor, put)`` for every tensor of the adapter; ``put(value)`` installs a replacement."""
    for path, module, attr, entry, _ in adapter_containers(modules, adapter_name):
        container = getattr(module, attr)
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
    def put(value: torch.Tensor) -> None:
        store[name] = nn.Parameter(value, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else value

    return put
