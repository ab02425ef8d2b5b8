"""Saves that survive being killed at any instant, a full disk, a mount point, and each other.

"Killed" means the process ends with ``os._exit`` right before its n-th file-system change (no ``finally``,
no cleanup: what SIGKILL or a power cut leaves), for every n from the first change to the last. After each,
a fresh model loads the folder: it must hold the previous checkpoint or the new one, complete, and the files
the save did not write (an HF ``Trainer``'s optimizer state) untouched.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel

from peft_swift_ext import AdapterConfig, Swift
from peft_swift_ext.core import transactions

from ..helpers import randomize_adapter
from ..tiny_models import tiny_llama
from ._forking import CRASHED, killed_at, run_in_child

#: Files an HF Trainer keeps beside the adapters; a save must never touch them.
FOREIGN = {"optimizer.pt": b"optimizer state", "trainer_state.json": b"{}", "runs/events.out": b"tensorboard"}
MAX_STEPS = 80
#: saves per thread in the concurrency test: the old code's rename race showed up about once in 60 saves
SAVES = 40


def build_model(seed: int, lora_only: bool = False):
    """Adapters ``ad0`` (LoRA) and ``ad1`` (an Adapter, or a second LoRA for PEFT's format), randomised."""
    second = (
        LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False)
        if lora_only
        else AdapterConfig(dim=32, target_modules=["mlp"], hidden_pos=0, adapter_length=4)
    )
    names = ("default", "ad1") if lora_only else ("ad0", "ad1")
    first = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = Swift.prepare_model(tiny_llama(), {names[0]: first, names[1]: second})
    for offset, name in enumerate(names):
        randomize_adapter(model, name, seed=seed + offset)
    return model.eval()


def adapters_of(model) -> dict[str, dict[str, torch.Tensor]]:
    return {name: model.adapter_state_dict(name) for name in model.adapters}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a.values(), b.values())
    )


def write_foreign(root: Path) -> None:
    for name, content in FOREIGN.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)


def foreign_intact(root: Path) -> bool:
    return all((root / name).is_file() and (root / name).read_bytes() == content for name, content in FOREIGN.items())


def bookkeeping_left(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".swift-save"))


@pytest.fixture(scope="module")
def versions(tmp_path_factory):
    """The previous checkpoint (with foreign files), and the model whose save replaces it."""
    base = tmp_path_factory.mktemp("versions")
    old_model, new_model = build_model(seed=0), build_model(seed=10)
    old_model.save_pretrained(base / "old")
    write_foreign(base / "old")
    return base, adapters_of(old_model), new_model, adapters_of(new_model)


@pytest.fixture(scope="module")
def lora_versions(tmp_path_factory):
    """Two SWIFT checkpoints of LoRA adapters ``default`` and ``ad1`` (old, new), for PEFT-format outputs."""
    base = tmp_path_factory.mktemp("lora-versions")
    for name, seed in (("old", 0), ("new", 10)):
        build_model(seed, lora_only=True).save_pretrained(base / name)
    return base


def load_state(root: Path) -> dict:
    return adapters_of(Swift.from_pretrained(tiny_llama(), root))


def test_save_pretrained_killed_at_every_file_operation_leaves_the_old_or_the_new_checkpoint(versions, tmp_path):
    base, old_state, new_model, new_state = versions
    outcomes = []
    for step in range(1, MAX_STEPS):
        root = tmp_path / f"crash-{step}"
        shutil.copytree(base / "old", root)
        result = run_in_child(killed_at, step, new_model.save_pretrained, root)
        loaded = load_state(root)
        assert same(loaded, old_state) or same(loaded, new_state), f"killed at file operation {step}: a mix"
        assert foreign_intact(root), f"killed at file operation {step}: files the save did not write changed"
        assert bookkeeping_left(root) == [], f"after recovery: {bookkeeping_left(root)}"
        outcomes.append("new" if same(loaded, new_state) else "old")
        if result.status != CRASHED:  # the save ran to its end
            print(f"{step - 1} file operations (killed before each, then run to the end), outcomes {outcomes}")
            assert result.error is None and result.status == 0, result
            break
    else:
        pytest.fail(f"the save did not finish within {MAX_STEPS} file operations")
    # killed early: the previous checkpoint; from the commit on: the new one (never back to the old)
    assert outcomes[0] == "old" and outcomes[-1] == "new"
    assert outcomes == sorted(outcomes, key=["old", "new"].index), outcomes


def half_switched(root: Path) -> bool:
    """Whether a killed save left ``root`` committed (journal in place) with some entries already moved in."""
    if not (root / transactions.JOURNAL_NAME).exists():
        return False
    staging = json.loads((root / transactions.JOURNAL_NAME).read_text())["staging"]
    return len(list((root / staging / "new").iterdir())) < 3  # ad0, ad1, configuration.json


def test_recovery_killed_at_every_file_operation_still_ends_with_the_new_checkpoint(versions, tmp_path):
    base, _, new_model, new_state = versions
    mid_switch = None
    for step in range(1, MAX_STEPS):
        probe = tmp_path / f"probe-{step}"
        shutil.copytree(base / "old", probe)
        run_in_child(killed_at, step, new_model.save_pretrained, probe)
        if half_switched(probe):
            mid_switch = step
            break
    assert mid_switch is not None, "no crash point left a committed, half-switched folder"
    for step in range(1, MAX_STEPS):
        root = tmp_path / f"double-{step}"
        shutil.copytree(base / "old", root)
        run_in_child(killed_at, mid_switch, new_model.save_pretrained, root)
        result = run_in_child(killed_at, step, transactions.recover, root)
        assert same(load_state(root), new_state), f"recovery killed at file operation {step}"
        assert foreign_intact(root) and bookkeeping_left(root) == []
        if result.status != CRASHED:
            break


def test_a_half_switched_folder_that_cannot_be_repaired_is_refused_loudly(versions, tmp_path, monkeypatch):
    base, _, new_model, _ = versions
    for step in range(1, MAX_STEPS):
        root = tmp_path / f"ro-{step}"
        shutil.copytree(base / "old", root)
        run_in_child(killed_at, step, new_model.save_pretrained, root)
        if half_switched(root):
            break
    before = tree(root)

    def read_only(*args, **kwargs):  # a read-only mount (root would ignore a chmod)
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only)
    with pytest.raises(ValueError, match="interrupted while switching files"):
        Swift.from_pretrained(tiny_llama(), root)
    assert tree(root) == before


def test_save_to_peft_format_killed_at_every_file_operation_leaves_the_old_or_the_new_output(lora_versions, tmp_path):
    for name in ("old", "new"):
        Swift.save_to_peft_format(lora_versions / name, tmp_path / f"ref-{name}")
    reference = {name: tree(tmp_path / f"ref-{name}") for name in ("old", "new")}
    outcomes = []
    for step in range(1, MAX_STEPS):
        out = tmp_path / f"peft-{step}"
        shutil.copytree(tmp_path / "ref-old", out)
        write_foreign(out)
        result = run_in_child(killed_at, step, Swift.save_to_peft_format, lora_versions / "new", out)
        transactions.recover(out)  # what any Swift load or save of the folder does first
        written = {k: v for k, v in tree(out).items() if k not in FOREIGN}
        assert written in (reference["old"], reference["new"]), f"killed at file operation {step}: a mix"
        assert foreign_intact(out) and bookkeeping_left(out) == []
        outcomes.append("new" if written == reference["new"] else "old")
        if result.status != CRASHED:
            break
    assert outcomes[0] == "old" and outcomes[-1] == "new"


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- a full disk ------------------------------------------------------------------------------------------------


def with_file_size_limit(nbytes: int, function, *args) -> None:
    """Run ``function(*args)`` unable to write a file beyond ``nbytes`` (EFBIG, as a full quota). Child only."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    function(*args)


def test_disk_full_during_save_pretrained_keeps_the_previous_checkpoint(versions, tmp_path):
    base, old_state, new_model, _ = versions
    root = tmp_path / "full"
    shutil.copytree(base / "old", root)
    before = tree(root)
    result = run_in_child(with_file_size_limit, 1024, new_model.save_pretrained, root)
    assert result.error is not None and ("File too large" in result.error or "EFBIG" in result.error), result
    assert tree(root) == before and bookkeeping_left(root) == []
    assert same(load_state(root), old_state)


def test_disk_full_during_save_to_peft_format_keeps_the_previous_output(lora_versions, tmp_path):
    Swift.save_to_peft_format(lora_versions / "old", tmp_path / "out")
    before = tree(tmp_path / "out")
    convert = Swift.save_to_peft_format
    result = run_in_child(with_file_size_limit, 1024, convert, lora_versions / "new", tmp_path / "out")
    assert result.error is not None, result
    assert tree(tmp_path / "out") == before


# --- a mount point ----------------------------------------------------------------------------------------------


def other_file_system(path: Path) -> Path | None:
    """A writable folder on another file system than ``path`` (/dev/shm is a tmpfs on most Linux hosts)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and os.stat(shm).st_dev != os.stat(path).st_dev:
        return shm
    return None


def test_save_into_a_symlink_to_another_file_system(versions, lora_versions, tmp_path):
    _, _, new_model, new_state = versions
    disk = other_file_system(tmp_path)
    if disk is None:
        pytest.skip("no second writable file system here; test_save_into_a_mount_point simulates one")
    volumes = [Path(tempfile.mkdtemp(prefix="swift-volume-", dir=disk)) for _ in range(2)]
    try:
        (tmp_path / "output").symlink_to(volumes[0])
        (tmp_path / "peft").symlink_to(volumes[1])
        write_foreign(tmp_path / "output")
        new_model.save_pretrained(tmp_path / "output")
        new_model.save_pretrained(tmp_path / "output")  # over an existing checkpoint
        Swift.save_to_peft_format(lora_versions / "new", tmp_path / "peft")
        assert same(load_state(tmp_path / "output"), new_state)
        assert foreign_intact(tmp_path / "output")
        assert PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft") is not None
    finally:
        for volume in volumes:
            shutil.rmtree(volume)


def test_save_into_a_mount_point(versions, lora_versions, tmp_path, monkeypatch):
    """Volumes mounted at ``output`` and ``peft``: renames across a mount fail with EXDEV, as in the kernel."""
    _, _, new_model, new_state = versions
    volumes = [tmp_path / "output", tmp_path / "peft"]
    for volume in volumes:
        volume.mkdir()
    write_foreign(volumes[0])

    def device(path) -> int:
        resolved = Path(os.path.abspath(path))
        return next((i for i, v in enumerate(volumes, 1) if resolved == v or v in resolved.parents), 0)

    for name in ("replace", "rename"):
        original = getattr(os, name)

        def across(src, dst, *args, _original=original, **kwargs):
            if device(src) != device(dst):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src), None, str(dst))
            return _original(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, name, across)
    new_model.save_pretrained(volumes[0])
    new_model.save_pretrained(volumes[0])  # over an existing checkpoint
    Swift.save_to_peft_format(lora_versions / "new", volumes[1])
    assert same(load_state(volumes[0]), new_state)
    assert foreign_intact(volumes[0])
    assert (volumes[1] / "adapter_model.safetensors").is_file() and (volumes[1] / "ad1").is_dir()


# --- what a save may touch --------------------------------------------------------------------------------------


def test_save_to_peft_format_keeps_the_checkpoint_and_everything_else_in_the_output(lora_versions, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(lora_versions / "old", run / "swift")
    write_foreign(run)
    swift_files = tree(run / "swift")
    Swift.save_to_peft_format(run / "swift", run)  # into the folder holding the checkpoint
    assert tree(run / "swift") == swift_files and foreign_intact(run)
    Swift.from_pretrained(tiny_llama(), run / "swift")  # still a loadable SWIFT checkpoint
    assert PeftModel.from_pretrained(tiny_llama(), run) is not None
    assert PeftModel.from_pretrained(tiny_llama(), run / "ad1") is not None


@pytest.mark.parametrize("where", ["same", "inside", "named_like_an_adapter"])
def test_save_to_peft_format_refuses_to_overwrite_the_checkpoint_it_converts(where, lora_versions, tmp_path):
    ckpt = tmp_path / ("ad1" if where == "named_like_an_adapter" else "ckpt")
    shutil.copytree(lora_versions / "old", ckpt)
    out = {"same": ckpt, "inside": ckpt / "peft", "named_like_an_adapter": tmp_path}[where]
    before = tree(ckpt)
    with pytest.raises(ValueError, match="overlaps the checkpoint"):
        Swift.save_to_peft_format(ckpt, out)
    assert tree(ckpt) == before


# --- saves and loads at the same time ---------------------------------------------------------------------------


def test_concurrent_saves_into_one_folder_all_succeed_and_loads_see_whole_checkpoints(versions, tmp_path):
    base, old_state, new_model, new_state = versions
    other = build_model(seed=20)
    other_state = adapters_of(other)
    root = tmp_path / "shared"
    shutil.copytree(base / "old", root)
    errors, seen = [], []
    stop = threading.Event()

    def saver(model):
        try:
            for _ in range(SAVES):
                model.save_pretrained(root)
        except BaseException as error:
            errors.append(repr(error))

    def reader():
        while not stop.is_set():
            try:
                seen.append(load_state(root))
            except BaseException as error:
                errors.append(repr(error))

    threads = [threading.Thread(target=saver, args=(m,)) for m in (new_model, other)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    assert errors == []
    final = load_state(root)
    assert same(final, new_state) or same(final, other_state)
    assert foreign_intact(root) and bookkeeping_left(root) == []
    wholes = [s for s in seen if any(same(s, ref) for ref in (old_state, new_state, other_state))]
    assert seen and len(wholes) == len(seen), "a load saw adapters from two different saves"
    assert json.loads((root / "configuration.json").read_text())["adapter_order"] == ["ad0", "ad1"]


def test_an_update_adopts_entries_written_by_a_writer_that_names_them(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    write_foreign(root)
    (root / "model.safetensors").write_bytes(b"old")
    with transactions.update(root) as staged:
        (staged.folder / "model.safetensors").write_bytes(b"new")  # a writer that picks its own file names
        staged.adopt("model.safetensors")
        with pytest.raises(FileNotFoundError):
            staged.adopt("config.json")  # never written
    assert (root / "model.safetensors").read_bytes() == b"new"
    assert foreign_intact(root) and bookkeeping_left(root) == []
