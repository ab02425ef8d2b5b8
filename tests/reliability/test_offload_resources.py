"""Offloading to ``'meta'`` without losing weights or leaking descriptors and folders.

The store writes an offloaded adapter to a file in a private temporary folder. These tests run it thousands
of times and count what stays open; make its reads and writes fail (an I/O error, no descriptor left, a full
disk, the file deleted by a temp cleaner) and check that nothing is lost and a retry works; and kill or end
the process to check that the folder does not outlive it.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import gc
import os
import pickle
import tempfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig

from peft_swift_ext import Swift
from peft_swift_ext.swift import offload

from ..helpers import randomize_adapter
from ..tiny_models import llama_inputs, tiny_llama
from ._forking import run_in_child

CYCLES = 5000


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """The temporary directory for this test alone, so that the folders counted are the store's."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def two_adapters():
    model = Swift.prepare_model(
        tiny_llama(num_layers=1),
        {"kept": LoraConfig(r=2, target_modules=["q_proj"]), "moved": LoraConfig(r=2, target_modules=["q_proj"])},
    )
    randomize_adapter(model, "kept", seed=0)
    randomize_adapter(model, "moved", seed=1)
    return model.eval()


def store_folders(tmp: Path) -> list[Path]:
    return sorted(tmp.glob("peft-swift-offload-*"))  # the store's prefix, before and after the fix


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_thousands_of_meta_offloads_keep_descriptors_and_folders_flat(private_tmp):
    model = two_adapters()
    reference = model.adapter_state_dict("moved")
    model.deactivate_adapter("moved", offload="meta")
    model.activate_adapter("moved")  # the store's folder now exists, with its one descriptor
    descriptors, folders = open_descriptors(), store_folders(private_tmp)
    assert len(folders) == 1
    for _ in range(CYCLES):
        model.deactivate_adapter("moved", offload="meta")
        model.activate_adapter("moved")
    assert open_descriptors() == descriptors
    assert store_folders(private_tmp) == folders and list(folders[0].iterdir()) == []
    state = model.adapter_state_dict("moved")
    assert all(torch.equal(state[key], reference[key]) for key in reference)


@pytest.mark.parametrize("code", [errno.EIO, errno.EMFILE], ids=["EIO", "EMFILE"])
def test_a_failed_read_keeps_the_adapter_offloaded_and_the_retry_restores_it(code, private_tmp, monkeypatch):
    model = two_adapters()
    model.set_active_adapters(["kept", "moved"])
    with torch.no_grad():
        expected = model(**llama_inputs()).logits
    reference = model.adapter_state_dict("moved")
    model.deactivate_adapter("moved", offload="meta")
    real_load = offload.load_file
    failures = [OSError(code, os.strerror(code))]

    def flaky(path):
        if failures:
            raise failures.pop()
        return real_load(path)

    monkeypatch.setattr(offload, "load_file", flaky)
    with pytest.raises(OSError):
        model.activate_adapter("moved")
    assert model.offload_store.is_offloaded("moved") and model.active_adapters == ["kept"]
    model.activate_adapter("moved")  # the retry
    assert not model.offload_store.is_offloaded("moved")
    state = model.adapter_state_dict("moved")
    assert all(torch.equal(state[key], reference[key]) for key in reference)
    with torch.no_grad():
        assert torch.equal(model(**llama_inputs()).logits, expected)
    assert list(store_folders(private_tmp)[0].iterdir()) == []


def test_a_failed_write_moves_nothing_and_leaves_no_file(private_tmp, monkeypatch):
    model = two_adapters()
    reference = model.adapter_state_dict("moved")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(offload, "save_file", disk_full)
    with pytest.raises(OSError):
        model.deactivate_adapter("moved", offload="meta")
    assert not model.offload_store.is_offloaded("moved")
    state = model.adapter_state_dict("moved")
    assert all(torch.equal(state[key], reference[key]) for key in reference)  # still resident, same values
    assert all(not any(folder.iterdir()) for folder in store_folders(private_tmp))


def test_a_file_deleted_behind_the_store_is_a_loud_error_and_the_folder_is_locked(private_tmp):
    model = two_adapters()
    model.deactivate_adapter("moved", offload="meta")
    (folder,) = store_folders(private_tmp)
    probe = os.open(folder, os.O_RDONLY)
    try:  # temp cleaners that honour locks (systemd-tmpfiles) skip a locked folder
        with pytest.raises(BlockingIOError):
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(probe)
    for file in folder.iterdir():
        file.unlink()  # a cleaner that does not
    with pytest.raises(FileNotFoundError, match="'moved'"):
        model.activate_adapter("moved")
    assert model.offload_store.is_offloaded("moved")  # refused, not silently "restored" as meta tensors


def test_the_folder_goes_with_the_model(private_tmp):
    model = two_adapters()
    model.deactivate_adapter("moved", offload="meta")
    assert len(store_folders(private_tmp)) == 1
    del model
    gc.collect()
    assert store_folders(private_tmp) == []


def offload_then(end: str, tmp: str) -> None:
    """In a child: offload an adapter to meta, then end as asked (a crash, or a normal interpreter exit)."""
    tempfile.tempdir = tmp
    model = two_adapters()
    model.deactivate_adapter("moved", offload="meta")
    if end == "crash":
        os._exit(9)
    assert len(store_folders(Path(tmp))) == 1
    atexit._run_exitfuncs()  # what the interpreter runs as it exits (the child then leaves with os._exit)


def test_a_killed_process_leaves_its_folder_only_until_the_next_store(private_tmp):
    assert run_in_child(offload_then, "crash", str(private_tmp)).error is None
    leftovers = store_folders(private_tmp)
    assert len(leftovers) == 1  # nothing could run at the kill
    model = two_adapters()
    model.deactivate_adapter("moved", offload="meta")  # the next store on the machine sweeps it
    assert leftovers[0] not in store_folders(private_tmp) and len(store_folders(private_tmp)) == 1


def test_interpreter_exit_removes_the_folder(private_tmp):
    assert run_in_child(offload_then, "exit", str(private_tmp)).error is None
    assert store_folders(private_tmp) == []


def test_a_copied_store_owns_its_own_copy_of_the_offloaded_weights(private_tmp):
    model = two_adapters()
    reference = model.adapter_state_dict("moved")
    model.deactivate_adapter("moved", offload="meta")
    copied = pickle.loads(pickle.dumps(model.offload_store))
    original_file, copied_file = model.offload_store.records["moved"].file, copied.records["moved"].file
    assert copied_file != original_file and copied_file.read_bytes() == original_file.read_bytes()
    model.activate_adapter("moved")  # the original's restore removes its file, not the copy's
    assert not original_file.exists() and copied_file.exists()
    state = model.adapter_state_dict("moved")
    assert all(torch.equal(state[key], reference[key]) for key in reference)
    del copied
    gc.collect()
    assert not copied_file.exists()
